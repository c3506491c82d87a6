"""Builds what the server runs from Settings: tokenizer and target, the
drafter (following the Redis pointer at start-up), the block sink, the engine
and the `ServerState` the API serves from. The one place the server is
assembled; imports no web framework."""

from __future__ import annotations

import copy
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from redis import Redis

from . import checkpoints, costmodel
from .async_engine import AsyncEngine
from .blocklog.record import BlockObservation
from .config import DEFAULT_MODEL, Settings
from .drafters import registry
from .drafters.base import Drafter
from .drafters.draft_model import DraftModelDrafter
from .drafters.ngram import NgramDrafter
from .drafters.none import NoDrafter
from .engine import Engine
from .llama import LlamaModel, load_llama
from .metrics import Metrics
from .modelstore import resolve_model
from .packed import is_packed, pack_linears
from .speculation import DraftLengthPolicy
from .warmup import warm_up

log = logging.getLogger(__name__)

FOLLOWING_KINDS = ("auto", "eagle3", "hybrid")  # DRAFTLOOP_DRAFTER values that follow the pointer
HYBRID_KINDS = ("auto", "hybrid")  # ... and serve the published eagle3 head wrapped with prompt lookup
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(eq=False)  # hashed by identity: tests cache per-target references
class Target:
    model: LlamaModel
    tokenizer: object  # a transformers tokenizer
    path: Path
    name: str  # the id clients pass as `model`
    model_id: str  # the target's identity recorded in checkpoints and block records
    eos_token_ids: set[int]
    stop_thresholds: tuple[float, ...] = ()  # per draft slot, from the verify-cost curve (service.costmodel)
    cost: dict = field(default_factory=dict)  # the measured curve, dtype choice and thresholds (/health)


def pick_device(setting: str) -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(setting)


def pick_dtype(setting: str, device: torch.device) -> torch.dtype:
    if setting == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if setting not in DTYPES:
        raise ValueError(f"DRAFTLOOP_DTYPE must be one of auto, {', '.join(DTYPES)}; got {setting!r}")
    return DTYPES[setting]


def local_model_dir(name: str, settings: Settings) -> Path:
    resolved = resolve_model(name, settings)
    path = Path(resolved)
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download  # a hub id: fetch (or find in the HF cache)

    return Path(snapshot_download(str(resolved), allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.txt"]))


def load_target(settings: Settings) -> Target:
    from transformers import AutoTokenizer

    path = local_model_dir(settings.target_model, settings)
    device = pick_device(settings.device)
    max_len, rows = settings.max_model_len + 64, settings.num_speculative_tokens + 1
    if settings.dtype == "auto" and device.type == "cpu":
        model, cost = load_fastest_on_cpu(path, settings.cache_dir, max_len, rows, settings.pack_weights)
    else:
        model = load_llama(path, dtype=pick_dtype(settings.dtype, device), device=device, max_len=max_len)
        if settings.pack_weights:
            pack_linears(model)
        cost = {"verify_seconds": costmodel.cached_curve(model, str(path), rows, settings.cache_dir)}
    thresholds = costmodel.resolve_thresholds(
        settings.min_confidence, cost["verify_seconds"], settings.num_speculative_tokens
    )
    cost.update(min_confidence=settings.min_confidence, stop_thresholds=thresholds)
    tokenizer = AutoTokenizer.from_pretrained(path)
    eos = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    cfg_eos = json.loads((path / "config.json").read_text()).get("eos_token_id")
    eos |= set(cfg_eos if isinstance(cfg_eos, list) else [cfg_eos] if cfg_eos is not None else [])
    name = settings.served_model_name or (
        DEFAULT_MODEL if settings.target_model == DEFAULT_MODEL else Path(settings.target_model).name
    )
    log.info("target %s loaded from %s on %s/%s", name, path, device, model.dtype)
    log.info("verify cost %s s (1..%d rows); stop thresholds %s", cost["verify_seconds"], rows, thresholds)
    return Target(model, tokenizer, path, name, settings.target_model, eos, tuple(thresholds), cost)


def load_fastest_on_cpu(path: Path, cache_dir: Path, max_len: int, rows: int, pack: bool = True) -> tuple[LlamaModel, dict]:
    """DRAFTLOOP_DTYPE=auto on a CPU: bfloat16 where it runs every verify width
    (1..rows) faster on this machine, else float32 (costmodel.fastest_dtype), from
    verify-cost curves measured once per machine and cached under cache_dir."""
    model = load_llama(path, dtype=torch.float32, device="cpu", max_len=max_len)
    if pack:
        pack_linears(model)
    context = costmodel.DEFAULT_CONTEXT
    keys = {
        "float32": costmodel.curve_key(str(path), torch.float32, model.device, rows, context, is_packed(model)),
        "bfloat16": costmodel.curve_key(str(path), torch.bfloat16, model.device, rows, context),
    }
    cached = {name: costmodel.read_curve(cache_dir, key) for name, key in keys.items()}
    half: LlamaModel | None = None
    if all(curve is not None for curve in cached.values()):
        curves = {name: list(curve or ()) for name, curve in cached.items()}
    else:  # both measured side by side (costmodel.measure_interleaved), then cached
        half = copy.deepcopy(model).to(torch.bfloat16)
        curves = costmodel.measure_interleaved({"float32": model, "bfloat16": half}, range(1, rows + 1), context)
        for name, key in keys.items():
            costmodel.store_curve(cache_dir, key, curves[name])
    choice = costmodel.fastest_dtype(curves)
    log.info("DRAFTLOOP_DTYPE=auto: %s (verify cost of 1..%d rows: %s s)", choice, rows, curves)
    if choice == "bfloat16":
        model = half if half is not None else model.to(torch.bfloat16)
    return model, {"dtype_auto": {"choice": choice, "curves": curves}, "verify_seconds": curves[choice]}


def load_published_drafter(
    settings: Settings,
    target: Target,
    redis: Redis | None = None,
    namespace: str = checkpoints.DEFAULT_NAMESPACE,
) -> Drafter | None:
    """The eagle3 version the Redis pointer names, pinned or not; without a
    pointer (or with Redis down: logged), the newest version on disk that
    loads. None when no version loads. See checkpoints.resolve."""
    client = redis or Redis.from_url(settings.redis_url, socket_timeout=5.0, socket_connect_timeout=2.0)
    try:
        pointer = checkpoints.read_pointer_at_startup(client, namespace)
    finally:
        if redis is None:
            client.close()
    kind = checkpoints.DEFAULT_KIND
    found = checkpoints.load_current(
        pointer, settings.checkpoint_dir, lambda path: registry.load(kind, path, target), kind
    )
    if found is None:
        return None
    log.info(
        "start-up drafter: %s v%d from %s (%s)",
        kind,
        found.version,
        found.path,
        ("pinned pointer" if pointer and pointer.get("pinned") else "pointer")
        if found.from_pointer
        else "newest on disk",
    )
    return found.value


def build_drafter(
    settings: Settings,
    target: Target,
    redis: Redis | None = None,
    namespace: str = checkpoints.DEFAULT_NAMESPACE,
) -> Drafter:
    """The drafter DRAFTLOOP_DRAFTER names. `auto` / `eagle3` / `hybrid`: the
    version the Redis pointer names (`load_published_drafter`), served as
    `serve_as` says; none at all -> ngram for `auto`, FileNotFoundError for
    `eagle3` and `hybrid`."""
    kind = settings.drafter
    if kind in FOLLOWING_KINDS:
        found = load_published_drafter(settings, target, redis, namespace)
        if found is not None:
            return serve_as(settings, found)
        if kind != "auto":
            raise FileNotFoundError(
                f"DRAFTLOOP_DRAFTER={kind} but no eagle3 checkpoint in {settings.checkpoint_dir}; "
                "run `draftloop train-sft` first"
            )
        log.warning("no eagle3 checkpoint in %s: falling back to the ngram drafter", settings.checkpoint_dir)
        kind = "ngram"
    if kind == "ngram":
        return NgramDrafter(settings.ngram_max, settings.ngram_min)
    if kind == "draft_model":
        return build_draft_model(settings, target)
    if kind == "none":
        return NoDrafter()
    raise ValueError(f"unknown DRAFTLOOP_DRAFTER {kind!r}: auto, hybrid, eagle3, draft_model, ngram, none")


def serve_as(settings: Settings, drafter: Drafter) -> Drafter:
    """A published eagle3 drafter as this server serves it: with DRAFTLOOP_DRAFTER
    auto or hybrid wrapped with prompt lookup (service.drafters.hybrid), with
    eagle3 as it is. Start-up and the reloader both go through here."""
    if settings.drafter not in HYBRID_KINDS or drafter.kind != "eagle3":
        return drafter
    from .drafters.hybrid import HybridDrafter  # torch-heavy eagle3: imported on first use

    lookup = NgramDrafter(settings.ngram_max, settings.ngram_min)
    return HybridDrafter(drafter, lookup, settings.hybrid_min_match)  # type: ignore[arg-type]


def build_draft_model(settings: Settings, target: Target) -> DraftModelDrafter:
    """A separate small draft model, or (none set) the target's first layers."""
    if settings.draft_model is None:
        layers = settings.draft_model_layers
        return DraftModelDrafter(target.model, layers, name=f"first-{layers}-layers")
    draft = load_llama(
        local_model_dir(settings.draft_model, settings),
        dtype=target.model.dtype,
        device=target.model.device,
        max_len=target.model.max_len,
    )
    if draft.cfg.vocab_size != target.model.cfg.vocab_size:
        raise ValueError("the draft model's vocabulary differs from the target's")
    return DraftModelDrafter(draft, name=Path(settings.draft_model).name)


def build_block_sink(
    settings: Settings, metrics: Metrics, target_model: str, on_close: list[Callable[[], None]]
) -> Callable[[BlockObservation], None] | None:
    """Where verify-step observations go (docs/architecture.md): a non-blocking
    hand-off to the block log's bounded queue; its writer thread talks to Redis."""
    if not settings.block_log:
        return None
    from .blocklog import BlockLogger, BlockRecord, PromptRecord

    logger = BlockLogger(
        settings.redis_url,
        settings.block_stream,
        maxlen=settings.block_stream_maxlen,
        queue_size=settings.block_queue_size,
        metrics=metrics,
        context_ttl_s=settings.block_context_ttl_s,
        store_contexts=settings.block_contexts,
    )
    on_close.append(lambda: logger.close(timeout=2.0))
    contexts = settings.block_contexts

    def sink(obs: BlockObservation) -> None:
        if contexts and obs.prompt_ids is not None:
            logger.submit(PromptRecord(obs.request_id, obs.prompt_ids))
        logger.submit(BlockRecord.from_observation(obs, target_model))

    kept = f"token contexts kept {settings.block_context_ttl_s} s" if contexts else "no token contexts"
    log.info("logging verify blocks to %s (stream %s, %s)", settings.redis_url, settings.block_stream, kept)
    return sink


@dataclass
class ServerState:
    """Everything a running server holds: built by `load_state`, served by the API."""

    settings: Settings
    target: Target
    metrics: Metrics
    engine: Engine
    async_engine: AsyncEngine
    created: int = field(default_factory=lambda: int(time.time()))
    on_close: list[Callable[[], None]] = field(default_factory=list)
    namespace: str = checkpoints.DEFAULT_NAMESPACE  # of the drafter pointer the server follows
    # refreshes the training backlog gauges from Redis (a scrape of /metrics calls it; None: no block log)
    probe_backlog: Callable[[], None] | None = None

    @property
    def model_names(self) -> set[str]:
        """Names a request's `model` may use: the served name or the target's id."""
        return {self.target.name, self.target.model_id}

    @property
    def system_fingerprint(self) -> str:
        drafter = self.engine.drafter
        return f"draftloop-{drafter.kind}-{drafter.version}"

    def close(self) -> None:
        self.engine.stop_loop()
        for fn in self.on_close:
            fn()


def speculation_policy(settings: Settings, target: Target) -> DraftLengthPolicy:
    """The serving engine's draft-length rule. `adaptive` needs the forward's
    cost at batch widths beside the 1..K+1 verify curve: measured here (once per
    machine, cached), since only a serving engine batches; /health shows them."""
    if settings.speculation != "adaptive":
        return DraftLengthPolicy("fixed")
    widths = costmodel.batch_widths(settings.num_speculative_tokens, settings.max_num_seqs)
    extra = costmodel.cached_points(target.model, str(target.path), widths, settings.cache_dir)
    target.cost["batch_seconds"] = {str(rows): s for rows, s in extra}
    points = [*enumerate(target.cost.get("verify_seconds", ()), 1), *extra]
    return DraftLengthPolicy("adaptive", points, settings.speculation_explore_every)


def backlog_probe(settings: Settings, metrics: Metrics) -> Callable[[], None] | None:
    """With the block log on: a function that reads the training consumer
    group's backlog from Redis into `draftloop_block_backlog` (a worker killed
    mid-update leaves its read blocks pending: this is where the server shows
    it). Redis down: the gauges keep their last values, the probe logs at debug."""
    if not settings.block_log:
        return None
    from redis import RedisError

    from .blocklog import group_backlog

    client = Redis.from_url(settings.redis_url, socket_timeout=1.0, socket_connect_timeout=0.5)

    def probe() -> None:
        try:
            undelivered, pending = group_backlog(client, settings.block_stream)
        except RedisError as exc:
            log.debug("block backlog not read: %s", exc)
            return
        metrics.block_backlog.labels(state="undelivered").set(undelivered)
        metrics.block_backlog.labels(state="pending").set(pending)

    return probe


def load_state(
    settings: Settings,
    target: Target | None = None,
    *,
    redis: Redis | None = None,
    namespace: str = checkpoints.DEFAULT_NAMESPACE,
) -> ServerState:
    """Load target (unless given) and drafter and build the engine (slow: runs
    before serving). `redis` / `namespace`: where the drafter pointer is read."""
    target = target or load_target(settings)
    drafter = build_drafter(settings, target, redis, namespace)
    metrics = Metrics()
    on_close: list[Callable[[], None]] = []
    engine = Engine(
        target.model,
        drafter,
        target.eos_token_ids,
        num_speculative_tokens=settings.num_speculative_tokens,
        metrics=metrics,
        block_sink=build_block_sink(settings, metrics, target.model_id, on_close),
        block_topk=settings.block_topk,
        max_num_seqs=settings.max_num_seqs,
        prefill_chunk=settings.prefill_chunk,
        speculation=speculation_policy(settings, target),
    )
    log.info(
        "serving %s with drafter %s v%s, K=%d, max_num_seqs=%d",
        target.name,
        drafter.kind,
        drafter.version,
        settings.num_speculative_tokens,
        settings.max_num_seqs,
    )
    if settings.warmup:
        warm_up(
            target.model, drafter, num_speculative_tokens=settings.num_speculative_tokens,
            max_num_seqs=settings.max_num_seqs, prefill_chunk=settings.prefill_chunk,
        )  # fmt: skip
    async_engine = AsyncEngine(engine, settings.max_queue)
    return ServerState(
        settings, target, metrics, engine, async_engine, on_close=on_close, namespace=namespace,
        probe_backlog=backlog_probe(settings, metrics),
    )  # fmt: skip
