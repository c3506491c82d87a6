"""Admin routes: which drafter is served, pin / roll back, unpin.

    GET    /admin/drafter       serving drafter, Redis pointer, versions on disk, refusals
    POST   /admin/drafter       {"version": N}: load v{N} now, pin the pointer to it
                                (every server follows; new worker versions don't move it)
                                {"version": null, "unpin": true}: follow the newest again
    DELETE /admin/drafter/pin   the same unpin

Unpin points back at the newest version the worker published (or, when Redis
has no record of one, the newest complete version on disk) and loads it now.

Auth: `Authorization: Bearer $DRAFTLOOP_ADMIN_TOKEN`. No token configured:
403 (admin is off); missing or wrong token: 401. Other errors: unknown
version 404, refused checkpoint 409 (with the reason), Redis down 503 -- all
in the OpenAI error format.

Reads `request.app.state.reloader` (a `service.reloader.DrafterReloader`);
its `settings` (admin token, checkpoint dir) and `engine` are the server's."""

from __future__ import annotations

import hmac
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Request
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt

from ..reloader import CheckpointRefused, DrafterReloader, PointerUnavailable, UnknownVersion
from .errors import APIError
from .protocol import ErrorResponse


def get_reloader(request: Request) -> DrafterReloader:
    reloader = getattr(request.app.state, "reloader", None)
    if reloader is None:
        raise APIError(
            503,
            "Drafter hot reload is not configured on this server.",
            type="server_error",
            code="admin_unavailable",
        )
    return reloader


ReloaderDep = Annotated[DrafterReloader, Depends(get_reloader)]


def require_admin(reloader: ReloaderDep, authorization: Annotated[str | None, Header()] = None) -> None:
    token = reloader.settings.admin_token
    if not token:
        raise APIError(
            403, "The admin API is disabled: set DRAFTLOOP_ADMIN_TOKEN to enable it.", code="admin_disabled"
        )
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise APIError(
            401, "Invalid or missing admin token (Authorization: Bearer <token>).", code="invalid_admin_token"
        )


ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 403, 404, 409, 503)
}
router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[Depends(require_admin)], responses=ERRORS)


class DrafterPointer(BaseModel):
    """The Redis pointer's JSON (service.checkpoints)."""

    kind: str = "eagle3"
    version: int
    path: str | None = None
    pinned: bool = False
    updated_at: str | None = None


class Refused(BaseModel):
    version: int
    path: str
    reason: str


class AdminDrafterStatus(BaseModel):
    serving: dict[str, Any] = Field(description="the serving drafter's describe(): kind, version, ...")
    pointer: DrafterPointer | None = Field(
        description="what the Redis pointer names (null: none, or Redis down)"
    )
    latest_published: DrafterPointer | None = Field(description="the newest version the worker published")
    versions: list[int] = Field(description="complete checkpoint versions on disk, oldest first")
    refused: list[Refused] = Field(description="versions this server refused to load, and why")
    following: bool = Field(
        description="whether this server follows the pointer (DRAFTLOOP_DRAFTER auto/eagle3)"
    )
    running: bool = Field(description="whether the reloader thread runs")
    redis: str


class SetDrafterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: Annotated[StrictInt, Field(ge=1)] | None = Field(None, description="pin to this version")
    unpin: StrictBool = Field(False, description="with version null: follow the newest version again")


def _status(reloader: DrafterReloader) -> AdminDrafterStatus:
    return AdminDrafterStatus.model_validate(reloader.status())


def _pin(reloader: DrafterReloader, version: int | None) -> AdminDrafterStatus:
    """Pin `version` (None: unpin) and load it now; the reloader's errors as API errors."""
    try:
        if version is None:
            reloader.unpin()
        else:
            reloader.pin(version)
    except UnknownVersion as exc:
        raise APIError(404, str(exc), param="version", code="version_not_found") from None
    except CheckpointRefused as exc:
        which = "The newest checkpoint" if version is None else f"Checkpoint v{version}"
        raise APIError(409, f"{which} refused: {exc}", param="version", code="checkpoint_refused") from None
    except PointerUnavailable as exc:
        raise APIError(503, str(exc), type="server_error", code="redis_unavailable") from None
    return _status(reloader)


# Sync routes: FastAPI runs them in its thread pool, so loading a checkpoint never blocks the event loop.
@router.get("/drafter", response_model=AdminDrafterStatus)
def get_drafter(reloader: ReloaderDep) -> AdminDrafterStatus:
    return _status(reloader)


@router.post("/drafter", response_model=AdminDrafterStatus)
def set_drafter(body: SetDrafterRequest, reloader: ReloaderDep) -> AdminDrafterStatus:
    if body.version is None and not body.unpin:
        raise APIError(
            400,
            'Give a version to pin, or {"version": null, "unpin": true}.',
            param="version",
            code="missing_required_parameter",
        )
    if body.version is not None and body.unpin:
        raise APIError(
            400, "Give either a version to pin or unpin: true, not both.", param="unpin", code="invalid_value"
        )
    return _pin(reloader, body.version)


@router.delete("/drafter/pin", response_model=AdminDrafterStatus)
def delete_pin(reloader: ReloaderDep) -> AdminDrafterStatus:
    return _pin(reloader, None)
