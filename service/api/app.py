"""The FastAPI application: lifespan (load target and drafter, start the
engine thread) and thin routes.

    POST /v1/completions       OpenAI legacy completions (JSON or SSE)
    POST /v1/chat/completions  OpenAI chat completions, through the model's chat template
    GET  /v1/models        the served model
    GET  /health           200 once the model is loaded; JSON with the drafter
                           and the engine's own acceptance statistics (τ)
    GET  /metrics          Prometheus text format

Run it with `draftloop serve`, or `uvicorn --factory service.api.app:create_app`."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from importlib import metadata
from typing import TypeVar

from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.responses import StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ..config import Settings, get_settings
from ..reloader import DrafterReloader
from ..runtime import ServerState, load_state
from .admin import router as admin_router
from .auth import APIKeyMiddleware, KeySet, load_api_keys
from .chat import ChatServiceDep
from .chat_protocol import ChatCompletionRequest, ChatCompletionResponse
from .completions import CompletionServiceDep
from .deps import StateDep
from .errors import APIError, install_error_handlers
from .protocol import (
    CompletionRequest,
    CompletionResponse,
    DrafterStatus,
    ErrorResponse,
    Health,
    ModelCard,
    ModelList,
    SpecDecodeStatus,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

ERRORS = {code: {"model": ErrorResponse} for code in (400, 404, 413, 500, 503)}
router = APIRouter()


@router.post("/v1/completions", response_model=CompletionResponse, responses=ERRORS)
async def create_completion(
    body: CompletionRequest, request: Request, service: CompletionServiceDep
) -> CompletionResponse | Response:
    return await respond(body, request, service)


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=ERRORS)
async def create_chat_completion(
    body: ChatCompletionRequest, request: Request, service: ChatServiceDep
) -> ChatCompletionResponse | Response:
    return await respond(body, request, service)


@router.get("/v1/models", response_model=ModelList)
async def list_models(state: StateDep) -> ModelList:
    return ModelList(data=[_model_card(state)])


@router.get("/v1/models/{model_id:path}", response_model=ModelCard, responses=ERRORS)
async def retrieve_model(model_id: str, state: StateDep) -> ModelCard:
    if model_id not in state.model_names:
        raise APIError(404, f"The model `{model_id}` does not exist.", param="model", code="model_not_found")
    return _model_card(state)


@router.get("/health", response_model=Health)
async def health(state: StateDep) -> Health:
    return _health(state)


@router.get("/metrics", response_class=Response)
async def metrics(state: StateDep) -> Response:
    if state.probe_backlog is not None:  # a Redis round trip: off the event loop
        await asyncio.to_thread(state.probe_backlog)
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


def _model_card(state: ServerState) -> ModelCard:
    return ModelCard(
        id=state.target.name,
        created=state.created,
        root=state.target.model_id,
        max_model_len=state.settings.max_model_len,
    )


def _health(state: ServerState) -> Health:
    """The engine's own statistics; /metrics carries the same observations."""
    stats, drafter, k = state.engine.stats, state.engine.drafter, state.engine.k
    return Health(
        model=state.target.name,
        drafter=DrafterStatus(kind=drafter.kind, version=drafter.version),
        spec_decode=SpecDecodeStatus(
            num_speculative_tokens=k,
            num_drafts=stats.num_drafts,
            num_draft_tokens=stats.num_draft_tokens,
            num_accepted_tokens=stats.num_accepted_tokens,
            tau=stats.tau,
            per_position_acceptance=stats.per_position_acceptance()[: max(k, 1)],
        ),
        cost_model=state.target.cost,
    )


async def respond(body, request: Request, service):
    """One generation request: an SSE stream, or the whole response unless the
    client leaves first (its sequences are cancelled; 499)."""
    prepared = await service.prepare(body)
    if body.stream:
        return StreamingResponse(service.stream(body, prepared), media_type="text/event-stream")
    result = await until_disconnect(request, service.create(body, prepared))
    return Response(status_code=499) if result is None else result


async def until_disconnect(request: Request, work: Awaitable[T]) -> T | None:
    """Await `work` unless the client disconnects first; then cancel it (which
    frees its engine slots) and return None."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    return None if task.cancelled() else task.result()


def _version() -> str:
    try:
        return metadata.version("draftloop")
    except metadata.PackageNotFoundError:  # running from a checkout that is not installed
        return "0+unknown"


def create_app(settings: Settings | None = None, runtime: ServerState | None = None) -> FastAPI:
    """The application. `runtime`: an already built ServerState (the caller
    owns it: it is started here but not closed); None: built at start-up
    from `settings` (default: the DRAFTLOOP_* environment)."""
    settings = settings or (runtime.settings if runtime is not None else get_settings())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state = runtime or await asyncio.to_thread(load_state, settings)
        state.engine.start_loop()
        app.state.server = state
        # follows the published drafter version (pub/sub + polling), off the decode path
        reloader = DrafterReloader(
            state.engine, state.target, state.settings, state.metrics, namespace=state.namespace
        )
        reloader.start()
        app.state.reloader = reloader
        log.info("ready: model %s, max_model_len %d", state.target.name, settings.max_model_len)
        try:
            yield
        finally:
            reloader.stop()
            if runtime is None:
                await asyncio.to_thread(state.close)

    app = FastAPI(title="draftloop", version=_version(), lifespan=lifespan)
    install_error_handlers(app, settings.max_body_bytes)
    install_api_keys(app, settings)
    app.include_router(router)
    app.include_router(admin_router)  # drafter reload / rollback (service/api/admin.py)
    return app


def install_api_keys(app: FastAPI, settings: Settings) -> None:
    """The API-key check (service/api/auth.py), outermost: an unauthenticated
    request is answered before its body is read. Raises APIKeyConfigError
    when DRAFTLOOP_API_KEYS cannot be used."""
    keys = load_api_keys(settings.api_keys)
    if not keys:
        if settings.host not in ("127.0.0.1", "localhost", "::1"):
            log.warning("no DRAFTLOOP_API_KEYS on %s: anyone who reaches the port can use /v1", settings.host)
        return
    app.add_middleware(APIKeyMiddleware, keys=KeySet(keys), metrics_open=settings.metrics_auth == "open")
    where = "open" if settings.metrics_auth == "open" else "behind the key"
    log.info("API keys: %d configured; /v1/* needs Authorization: Bearer, /metrics %s", len(keys), where)
