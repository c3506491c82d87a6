"""The `draftloop` command.

    draftloop serve [--host H] [--port P] [--drafter KIND] [--num-speculative-tokens K] ...
    draftloop fetch-model
    draftloop up                      (Redis if needed + server + Celery worker + beat)
    draftloop train-sft [ARGS...]     (worker.train.cli, see `draftloop train-sft --help`)
    draftloop export-drafter --format speculators|sglang [--version N] OUT_DIR
    draftloop import-drafter SRC      (worker.importer, see `draftloop import-drafter --help`)

Flags override the DRAFTLOOP_* environment (see service.config). Heavy
imports (torch, transformers, uvicorn) happen inside the commands, so
`--help` stays fast."""

from __future__ import annotations

import argparse
import importlib.util
import logging
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from pydantic import ValidationError

from .config import Settings

log = logging.getLogger("draftloop")

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LOG_LEVELS = ("debug", "info", "warning", "error")
DRAFTERS = ("auto", "hybrid", "eagle3", "draft_model", "ngram", "none")

# serve flag -> Settings field (flags left out keep the environment's value)
SERVE_FLAGS: dict[str, tuple[str, type, str]] = {
    "--host": ("host", str, "address to bind"),
    "--port": ("port", int, "port to bind"),
    "--target-model": ("target_model", str, "HF folder / hub id, or the embedded default"),
    "--served-model-name": ("served_model_name", str, "the name clients pass as `model`"),
    "--drafter": ("drafter", str, f"one of {', '.join(DRAFTERS)}"),
    "--num-speculative-tokens": ("num_speculative_tokens", int, "K, tokens drafted per step"),
    "--max-num-seqs": ("max_num_seqs", int, "sequences decoded together in one batch"),
    "--prefill-chunk": ("prefill_chunk", int, "prompt tokens prefilled per engine iteration"),
    "--max-queue": ("max_queue", int, "waiting sequences before 503"),
    "--max-model-len": ("max_model_len", int, "prompt + completion tokens per sequence"),
    "--device": ("device", str, "auto | cpu | cuda | cuda:N"),
    "--dtype": ("dtype", str, "auto | float32 | bfloat16 | float16"),
    "--checkpoint-dir": ("checkpoint_dir", str, "drafter checkpoints"),
}


def configure_logging(level: str = "info") -> None:
    logging.basicConfig(level=level.upper(), format=LOG_FORMAT, stream=sys.stderr, force=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="draftloop", description="Speculative-decoding LLM server.")
    parser.add_argument("--log-level", choices=LOG_LEVELS, default="info")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the OpenAI-compatible server")
    for flag, (field, kind, help_) in SERVE_FLAGS.items():
        choices = DRAFTERS if field == "drafter" else None
        serve.add_argument(flag, dest=field, type=kind, default=None, choices=choices, help=help_)
    serve.add_argument("--log-level", choices=LOG_LEVELS, default=argparse.SUPPRESS)

    fetch = sub.add_parser("fetch-model", help="prepare the embedded default model (idempotent)")
    fetch.add_argument("--cache-dir", default=None, help="default: DRAFTLOOP_CACHE_DIR")
    fetch.add_argument("--log-level", choices=LOG_LEVELS, default=argparse.SUPPRESS)

    up = sub.add_parser("up", help="run the whole loop here: server, Celery worker and beat (and Redis if none)")
    up.add_argument("--log-level", choices=LOG_LEVELS, default=argparse.SUPPRESS)

    # its own parser (worker.train.cli) reads the rest of the command line, --help included
    sub.add_parser("train-sft", help="train the SFT bootstrap drafter (worker.train.cli)", add_help=False)
    _add_export_parser(sub)
    imp_help = "import a speculators/SGLang EAGLE-3 head (worker.importer)"
    sub.add_parser("import-drafter", help=imp_help, add_help=False)
    return parser


def _add_export_parser(sub) -> None:
    exp = sub.add_parser("export-drafter", help="write an eagle3 version in the speculators (vLLM) or SGLang format")
    exp.add_argument("out_dir", type=Path, metavar="OUT_DIR", help="folder to create (absent or empty)")
    exp.add_argument("--format", dest="fmt", required=True, choices=("speculators", "sglang"))
    exp.add_argument("--version", type=int, default=None, help="eagle3 version (default: the newest on disk)")
    exp.add_argument("--verifier", default=None, help="the target's name for the engine (default: its hub id)")
    exp.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"), help="default: as saved")
    exp.add_argument("--checkpoint-dir", default=None, help="default: DRAFTLOOP_CHECKPOINT_DIR")
    exp.add_argument("--num-speculative-tokens", type=int, default=None, help="K written for the engine")
    exp.add_argument("--log-level", choices=LOG_LEVELS, default=argparse.SUPPRESS)


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from .api.app import create_app
    from .api.auth import APIKeyConfigError

    overrides = {field: v for field, *_ in SERVE_FLAGS.values() if (v := getattr(args, field)) is not None}
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        log.error("invalid setting: %s", exc)
        return 2
    try:
        app = create_app(settings)
    except APIKeyConfigError as exc:  # its message names the setting, never a key
        log.error("%s", exc)
        return 2
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=args.log_level, log_config=None)
    return 0


def fetch_model(args: argparse.Namespace) -> int:
    from .modelstore import fetch_default_model

    settings = Settings(**({"cache_dir": args.cache_dir} if args.cache_dir else {}))
    path = fetch_default_model(settings.cache_dir, progress=log.info)
    print(path)  # the command's result, for scripts
    return 0


def export_drafter(args: argparse.Namespace) -> int:
    from .checkpoints.store import CheckpointError
    from .drafters.eagle3.formats import FormatError
    from .export import export_drafter as run

    fields = {"checkpoint_dir": args.checkpoint_dir, "num_speculative_tokens": args.num_speculative_tokens}
    settings = Settings(**{k: v for k, v in fields.items() if v is not None})
    try:
        out = run(settings, args.fmt, args.out_dir, args.version, args.verifier, args.dtype)
    except (FormatError, CheckpointError, FileNotFoundError, FileExistsError) as exc:
        log.error("export-drafter: %s", exc)
        return 2
    print(out)  # the command's result, for scripts
    return 0


WORKER_COMMANDS = {"train-sft": "worker.train.cli", "import-drafter": "worker.importer"}


def hand_over(command: str, argv: list[str]) -> int:
    """Run a worker command in a child interpreter (the server side imports
    nothing of worker/) -> its exit status."""
    module = WORKER_COMMANDS[command]
    if importlib.util.find_spec("worker") is None:
        log.error("`draftloop %s` needs %s, which is not installed in this checkout", command, module)
        return 2
    return subprocess.call([sys.executable, "-m", module, *argv])


def main(argv: Sequence[str] | None = None) -> int:
    args, rest = build_parser().parse_known_args(argv)
    configure_logging(args.log_level)
    if args.command in WORKER_COMMANDS:
        return hand_over(args.command, rest)
    if rest:
        build_parser().error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command == "serve":
        return serve(args)
    if args.command == "up":
        from .stack import up

        return up(Settings())
    if args.command == "export-drafter":
        return export_drafter(args)
    return fetch_model(args)


if __name__ == "__main__":
    sys.exit(main())
