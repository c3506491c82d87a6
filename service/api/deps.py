"""The `Annotated` dependencies that hand the server state (built at start-up
by `service.runtime.load_state`) to route functions. Routes of other modules
(e.g. admin) import their dependencies from here, not from `app`."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from ..config import Settings
from ..runtime import ServerState


def get_state(request: Request) -> ServerState:
    return request.app.state.server


StateDep = Annotated[ServerState, Depends(get_state)]


def get_settings_dep(state: StateDep) -> Settings:
    """The settings the server runs with (CLI flags included), not a fresh read of the environment."""
    return state.settings


SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
