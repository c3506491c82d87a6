"""What the routes share: the server state built at start-up (settings,
target, metrics, engine) and the `Annotated` dependencies that hand it to
route functions. Routes of other modules (e.g. admin) import their
dependencies from here, not from `app`."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request

from ..async_engine import AsyncEngine
from ..config import Settings
from ..engine import BlockObservation, Engine
from ..metrics import Metrics
from ..runtime import Target, build_drafter, load_target

log = logging.getLogger(__name__)


@dataclass
class ServerState:
    settings: Settings
    target: Target
    metrics: Metrics
    engine: Engine
    async_engine: AsyncEngine
    created: int = field(default_factory=lambda: int(time.time()))
    on_close: list[Callable[[], None]] = field(default_factory=list)

    @property
    def model_names(self) -> set[str]:
        """Names a request's `model` may use: the served name or the target's id."""
        return {self.target.name, self.target.model_id}

    @property
    def system_fingerprint(self) -> str:
        d = self.engine.drafter
        return f"draftloop-{d.kind}-{d.version}"

    def close(self) -> None:
        self.engine.stop_loop()
        for fn in self.on_close:
            fn()


def build_block_sink(
    settings: Settings, metrics: Metrics, target_model: str, on_close: list[Callable[[], None]]
) -> Callable[[BlockObservation], None] | None:
    """Where verify-step observations go (DESIGN §6): a non-blocking hand-off to
    the block log's bounded queue; its writer thread talks to Redis."""
    if not settings.block_log:
        return None
    from ..blocklog import BlockLogger, BlockRecord, PromptRecord

    logger = BlockLogger(
        settings.redis_url,
        settings.block_stream,
        maxlen=settings.block_stream_maxlen,
        queue_size=settings.block_queue_size,
        metrics=metrics,
    )
    on_close.append(lambda: logger.close(timeout=2.0))

    def sink(obs: BlockObservation) -> None:
        if obs.prompt_ids is not None:
            logger.submit(PromptRecord(obs.request_id, obs.prompt_ids))
        logger.submit(BlockRecord.from_observation(obs, target_model))

    log.info("logging verify blocks to %s (stream %s)", settings.redis_url, settings.block_stream)
    return sink


def load_state(settings: Settings) -> ServerState:
    """Load target and drafter and build the engine (slow: runs before serving)."""
    target = load_target(settings)
    drafter = build_drafter(settings, target)
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
    )
    log.info(
        "serving %s with drafter %s v%s, K=%d, max_num_seqs=%d",
        target.name,
        drafter.kind,
        drafter.version,
        settings.num_speculative_tokens,
        settings.max_num_seqs,
    )
    return ServerState(settings, target, metrics, engine, AsyncEngine(engine, settings.max_queue), on_close=on_close)


def get_state(request: Request) -> ServerState:
    return request.app.state.server


StateDep = Annotated[ServerState, Depends(get_state)]


def get_settings_dep(state: StateDep) -> Settings:
    """The settings the server runs with (CLI flags included), not a fresh read of the environment."""
    return state.settings


SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
