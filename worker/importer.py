"""`draftloop import-drafter SRC` (`python -m worker.importer`): an EAGLE-3 head
in the speculators (vLLM) or SGLang/SpecForge format becomes a new eagle3
version, published through the same gate as a trained one.

SRC is a local folder, or a hub id where the hub is reachable. The head is
checked against the target (hidden size, vocabulary, layer taps, the layer's
shape) and anything our head cannot represent is refused with the reason
(`service.drafters.eagle3.formats.import_config`). The converted head is saved
as the next version, staged out of the store while the gate judges it against
the drafter the servers serve (`worker.publish_gate`), and published (pointer
moved, servers reload) only when the gate says so; the loop then keeps training
it like any version. A report lands in `<checkpoint_dir>/reports/` either way."""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from service.config import Settings
from service.drafters import eagle3
from service.drafters.eagle3.formats import FormatError, import_config, import_tensors, read_folder

if TYPE_CHECKING:
    from service.runtime import Target

log = logging.getLogger("worker.importer")

EMBED_ATOL = 1e-2  # an embedding the head ships must be the target's (up to bf16 rounding of O(1) values)


class ImportFailed(RuntimeError):
    """The source could not be fetched, or its head not converted; the message says why."""


def fetch_source(src: str) -> Path:
    """A local folder as is; a hub id (owner/name) downloaded (config + safetensors)."""
    path = Path(src)
    if path.is_dir():
        return path
    if path.exists() or src.count("/") != 1:
        raise ImportFailed(f"{src}: not a folder, and not a hub id of the form owner/name")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(src, allow_patterns=["config.json", "*.safetensors"]))
    except Exception as exc:  # offline, unknown id, gated: one clear message
        raise ImportFailed(
            f"could not fetch {src!r} from the Hugging Face hub ({type(exc).__name__}: {exc}); "
            "download it where the hub is reachable and pass the local folder"
        ) from None


def _check_embedding(tensors: dict[str, torch.Tensor], target: Target) -> None:
    """A shipped embedding must be the target's: ours is always shared from it."""
    emb = tensors.get("embed_tokens.weight", tensors.get("model.embed_tokens.weight"))
    if emb is None:
        return
    own = target.model.embed_tokens.weight.detach().float().cpu()
    if emb.shape != own.shape or not torch.allclose(emb.float(), own, atol=EMBED_ATOL, rtol=1e-2):
        raise FormatError(
            "the head ships its own token embedding, not the target's; ours shares the target's"
        )


def convert(src_dir: Path, target: Target) -> tuple[eagle3.Eagle3Head, dict[str, Any]]:
    """A format folder -> (our head, float32, attached to the target; what was read)."""
    config, tensors = read_folder(src_dir)
    fmt, cfg = import_config(config, target.model.cfg)
    _check_embedding(tensors, target)
    state = {k: (v.float() if v.is_floating_point() else v) for k, v in import_tensors(tensors, cfg).items()}
    head = eagle3.Eagle3Head(cfg)
    try:
        head.load_state_dict(state, strict=True)
    except RuntimeError as exc:  # missing tensors or wrong shapes: name them
        raise FormatError(f"{src_dir}: the tensors do not fit the head: {exc}") from None
    info = {
        "format": fmt,
        "source": str(src_dir),
        "hidden_layers": list(cfg.hidden_layers),
        "fc_norm": cfg.fc_norm,
        "draft_vocab_size": cfg.draft_vocab_size,
        "source_layer_ids": config.get("eagle_aux_hidden_state_layer_ids")
        or (config.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids"),
    }
    return head.attach(target.model), info


def publish_imported(
    settings: Settings, target: Target, head: eagle3.Eagle3Head, info: dict[str, Any]
) -> dict[str, Any]:
    """Save the head as the next version, gate it, publish it if the gate passes
    -> the run's report (also written to the reports folder)."""
    import redis

    from service import checkpoints

    from .lock import training_lock
    from .publish_gate import publish_decision, stage, unstage
    from .reports import write_report
    from .tasks import LOCK_NAME, LOCK_RENEW_S, LOCK_TTL_S
    from .update import opd_config

    t0 = time.perf_counter()
    r = redis.Redis.from_url(settings.redis_url, socket_timeout=10.0, socket_connect_timeout=5.0)
    with training_lock(r, LOCK_NAME, timeout_s=LOCK_TTL_S, renew_every_s=LOCK_RENEW_S) as acquired:
        if not acquired:
            raise ImportFailed("an update holds the training lock; import again when it has finished")
        path = eagle3.save_checkpoint(
            head, settings.checkpoint_dir, target.model_id, extra={"imported_from": info}
        )
        version = int(path.name.removeprefix("v"))
        staged = stage(path, Path(settings.checkpoint_dir))
        gate = publish_decision(r, settings, target, head, [], opd_config(settings))
        report: dict[str, Any] = {
            "kind": "import",
            "imported_from": info,
            "target_model": target.model_id,
            "gate": gate.as_dict(),
            "tau_before": gate.incumbent_tau,
            "tau_after": gate.candidate_tau,
        }
        if gate.publish:
            moved = checkpoints.publish_version(r, version, unstage(staged, path))
            report.update(
                status="published",
                published=True,
                pointer_moved=moved,
                new_version=version,
                checkpoint=str(path),
            )
        else:
            report.update(
                status="not_published",
                published=False,
                pointer_moved=False,
                new_version=None,
                checkpoint=str(staged),
            )
        report["duration_s"] = round(time.perf_counter() - t0, 2)
        write_report(Path(settings.checkpoint_dir), version, report)
    log.info("import of %s: %s (%s)", info["source"], report["status"], gate.reason)
    return report


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="draftloop import-drafter",
        description="Import an EAGLE-3 head in the speculators (vLLM) or SGLang/SpecForge format as a new "
        "eagle3 version; it is published only if the publish gate finds it better than the serving drafter.",
    )
    p.add_argument(
        "src", metavar="SRC", help="a local folder (config.json + *.safetensors), or a hub id owner/name"
    )
    p.add_argument("--checkpoint-dir", type=Path, help="default: DRAFTLOOP_CHECKPOINT_DIR")
    p.add_argument("--threads", type=int, default=1, help="torch threads on CPU (the gate decodes)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from service.runtime import load_target

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    settings = Settings(**({"checkpoint_dir": args.checkpoint_dir} if args.checkpoint_dir else {}))
    try:
        src = fetch_source(args.src)
        target = load_target(settings)
        head, info = convert(src, target)
        report = publish_imported(settings, target, head, info)
    except (ImportFailed, FormatError, eagle3.CheckpointError) as exc:
        log.error("import-drafter: %s", exc)
        return 2
    print(report["checkpoint"])  # the command's result, for scripts
    return 0 if report["published"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
