"""API keys: with DRAFTLOOP_API_KEYS set, every request needs
`Authorization: Bearer <key>`, checked by one ASGI middleware in front of
every route, so a route added later is covered without doing anything.

Open without a key: `/health` (probes), the API docs (`/docs`, `/redoc`,
`/openapi.json`), `/metrics` unless DRAFTLOOP_METRICS_AUTH=key, and `/admin/*`,
which has its own token (service/api/admin.py). Everything else, `/v1/*` and
unknown paths alike, answers 401 without a valid key (so a scan learns
nothing about which routes exist).

DRAFTLOOP_API_KEYS is either a comma-separated list of keys, or -- when the
value starts with `/`, `./`, `../` or `~/` -- the path of a file with one key
per line (blank lines and lines starting with `#` skipped). Keys are read once
at start-up. A key is compared with every configured key in constant time
(sha256 of both, then `hmac.compare_digest`, all keys tried), and no error
message or log line ever contains a key."""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Sequence
from pathlib import Path

from pydantic import SecretStr
from starlette.types import ASGIApp, Receive, Scope, Send

from .errors import APIError, send_api_error

log = logging.getLogger(__name__)

OPEN_PATHS = frozenset({"/health", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"})
ADMIN_PREFIX = "/admin"  # guarded by DRAFTLOOP_ADMIN_TOKEN instead
_FILE_PREFIXES = ("/", "./", "../", "~/")
_HINT = "Send it as `Authorization: Bearer <key>`."


class APIKeyConfigError(ValueError):
    """DRAFTLOOP_API_KEYS cannot be used; the message never contains a key."""


def is_key_file(value: str) -> bool:
    """Whether a DRAFTLOOP_API_KEYS value names a file rather than listing keys."""
    return value.startswith(_FILE_PREFIXES)


def parse_keys(text: str, separator: str) -> list[str]:
    """Keys from a comma list (separator ",") or a file's text (separator "\\n");
    empty entries and, in files, `#` comment lines are skipped. Raises
    APIKeyConfigError naming the entry by number (never by value)."""
    keys = []
    for number, raw in enumerate(text.split(separator), start=1):
        key = raw.strip()
        if not key or (separator == "\n" and key.startswith("#")):
            continue
        if not all("!" <= ch <= "~" for ch in key) or (separator == "\n" and "," in key):
            what = "line" if separator == "\n" else "entry"
            raise APIKeyConfigError(
                f"DRAFTLOOP_API_KEYS: {what} {number} is not a usable key "
                "(visible ASCII only, no spaces or commas)"
            )
        keys.append(key)
    return keys


def load_api_keys(setting: SecretStr | None) -> list[str]:
    """The configured keys; [] when DRAFTLOOP_API_KEYS is unset or empty (no auth)."""
    value = setting.get_secret_value().strip() if setting is not None else ""
    if not value:
        return []
    if is_key_file(value):
        path = Path(value).expanduser()
        try:
            keys = parse_keys(path.read_text(encoding="utf-8"), "\n")
        except (OSError, UnicodeDecodeError) as exc:
            raise APIKeyConfigError(f"DRAFTLOOP_API_KEYS: cannot read the key file {path}: {exc}") from None
        where = f"the key file {path}"
    else:
        keys, where = parse_keys(value, ","), "the comma list"
    if not keys:
        raise APIKeyConfigError(f"DRAFTLOOP_API_KEYS: {where} holds no key")
    return keys


class KeySet:
    """Configured keys, kept as sha256 digests so that every comparison is
    between equal-length values (compare_digest then leaks no length)."""

    def __init__(self, keys: Sequence[str]) -> None:
        self._digests = [hashlib.sha256(k.encode()).digest() for k in keys]

    def __len__(self) -> int:
        return len(self._digests)

    def matches(self, given: bytes) -> bool:
        digest = hashlib.sha256(given).digest()
        found = False
        for known in self._digests:  # no early exit: time does not say which key matched
            found |= hmac.compare_digest(digest, known)
        return found


def needs_key(path: str, metrics_open: bool) -> bool:
    """Whether a request for `path` must carry an API key (keys configured)."""
    if path in OPEN_PATHS or path == ADMIN_PREFIX or path.startswith(ADMIN_PREFIX + "/"):
        return False
    if path == "/metrics":
        return not metrics_open
    return True


def bearer_token(headers: Sequence[tuple[bytes, bytes]]) -> bytes | None:
    """The token of the first `Authorization: Bearer <token>` header; None if absent or another scheme."""
    for name, value in headers:
        if name.lower() == b"authorization":
            scheme, _, token = value.strip().partition(b" ")
            token = token.strip()
            return token if scheme.lower() == b"bearer" and token else None
    return None


class APIKeyMiddleware:
    """Answers 401 (OpenAI error format) to requests that need a key and lack a valid one."""

    def __init__(self, app: ASGIApp, keys: KeySet, metrics_open: bool) -> None:
        self.app = app
        self.keys = keys
        self.metrics_open = metrics_open

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or not needs_key(scope["path"], self.metrics_open):
            await self.app(scope, receive, send)
            return
        token = bearer_token(scope.get("headers") or [])
        if token is not None and self.keys.matches(token):
            await self.app(scope, receive, send)
            return
        reason = "missing" if token is None else "wrong"
        client = (scope.get("client") or ("?",))[0]
        method = scope.get("method", "WEBSOCKET")
        log.info("401 for %s %s from %s: %s API key", method, scope["path"], client, reason)
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})  # policy violation
            return
        await send_api_error(send, _unauthorized(reason), [(b"www-authenticate", b"Bearer")])


def _unauthorized(reason: str) -> APIError:
    message = "You didn't provide an API key." if reason == "missing" else "Incorrect API key provided."
    return APIError(
        401, f"{message} {_HINT}", type="invalid_request_error", code="invalid_api_key"
    )
