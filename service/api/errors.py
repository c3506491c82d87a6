"""Every error the API returns, in the OpenAI format
`{"error": {"message", "type", "param", "code"}}`.

- `APIError`: raised by handlers for checks that need the model (404 unknown
  model, 400 context length / vocabulary); `EngineOverloaded` (queue full): 503
  with a `Retry-After` header (seconds).
- request validation (wrong types, out-of-range values, body not JSON): 400
  with `param` naming the offending top-level field (OpenAI answers 400, not
  FastAPI's 422).
- HTTP errors of the framework (unknown route 404, wrong method 405): same
  status, OpenAI body.
- `BodyLimitMiddleware`: 413 for a body over DRAFTLOOP_MAX_BODY_BYTES,
  checked before anything parses it.
- 401 for a missing or wrong API key: `service.api.auth`, through `send_api_error`.
- anything else is a server bug: 500, logged with its traceback, and no
  details leak to the client."""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..async_engine import EngineOverloaded

log = logging.getLogger(__name__)

INVALID_REQUEST = "invalid_request_error"
_TYPE_BY_STATUS = {
    401: "authentication_error",
    403: "permission_error",
    429: "rate_limit_error",
    503: "server_error",
}
# union members pydantic puts into `loc`; they name types, not fields
_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


class APIError(Exception):
    def __init__(
        self,
        status_code: int,
        message: str,
        *,
        type: str | None = None,
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.type = type or _TYPE_BY_STATUS.get(status_code, INVALID_REQUEST)
        self.param = param
        self.code = code


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(exc: APIError) -> JSONResponse:
    return JSONResponse(error_body(exc.message, exc.type, exc.param, exc.code), status_code=exc.status_code)


def validation_param(loc: tuple[Any, ...]) -> str | None:
    """("body", "stream_options", "include_usage") -> "stream_options.include_usage";
    ("body", "prompt", "list[int]", 0) -> "prompt"; ("body",) -> None."""
    parts: list[str] = []
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        if not isinstance(part, str) or not part.isidentifier() or part in _TYPE_TAGS:
            break
        parts.append(part)
    return ".".join(parts) or None


def validation_error(errors: list[dict[str, Any]]) -> APIError:
    """The first validation error as a 400 (OpenAI reports one problem at a time)."""
    if not errors:
        return APIError(400, "Invalid request")
    err = errors[0]
    kind, loc = err.get("type", ""), tuple(err.get("loc", ()))
    if kind == "json_invalid":
        detail = (err.get("ctx") or {}).get("error", "")
        return APIError(400, f"The request body is not valid JSON ({detail}).", code="invalid_json")
    param = validation_param(loc)
    if param is None:
        if kind == "missing":
            return APIError(400, "The request needs a JSON body.", code="missing_body")
        return APIError(400, "The request body must be a JSON object.", code="invalid_body")
    msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
    if kind == "missing":
        return APIError(
            400, f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter"
        )
    if kind == "extra_forbidden":
        return APIError(
            400, f"Unrecognized request argument supplied: '{param}'.", param=param, code="unknown_parameter"
        )
    return APIError(400, f"Invalid value for '{param}': {msg}", param=param, code="invalid_value")


async def _api_error(request: Request, exc: APIError) -> JSONResponse:
    return error_response(exc)


async def _request_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return error_response(validation_error(list(exc.errors())))


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    message = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
    body = error_body(message, _TYPE_BY_STATUS.get(exc.status_code, INVALID_REQUEST))
    return JSONResponse(body, status_code=exc.status_code, headers=getattr(exc, "headers", None))


async def _overloaded(request: Request, exc: EngineOverloaded) -> JSONResponse:
    # 503, not 429: the server is busy, the client did nothing wrong (OpenAI answers overload so)
    response = error_response(APIError(503, str(exc), code="server_overloaded"))
    response.headers["Retry-After"] = str(exc.retry_after_s)
    return response


async def _unhandled_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return JSONResponse(
        error_body(
            "The server had an error while processing your request.", "server_error", code="internal_error"
        ),
        status_code=500,
    )


def install_error_handlers(app: FastAPI, max_body_bytes: int) -> None:
    app.add_exception_handler(APIError, _api_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _request_validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _http_error)  # type: ignore[arg-type]
    app.add_exception_handler(EngineOverloaded, _overloaded)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _unhandled_error)
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_body_bytes)


class BodyLimitMiddleware:
    """Refuses request bodies over `max_bytes` with 413: at once when
    Content-Length says so, else while reading a chunked body. The body is
    buffered (at most `max_bytes`) and replayed to the app."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                await send_api_error(send, APIError(400, "Invalid Content-Length header."))
                return
            if size > self.max_bytes:
                await send_api_error(send, self._too_large())
                return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await send_api_error(send, self._too_large())
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # later calls: disconnect detection

        await self.app(scope, replay, send)

    def _too_large(self) -> APIError:
        return APIError(
            413,
            f"The request body exceeds the limit of {self.max_bytes} bytes.",
            code="request_too_large",
        )



async def send_api_error(send: Send, exc: APIError, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    """Answer an HTTP request with `exc` in the OpenAI format, from an ASGI
    middleware (before any route or exception handler runs)."""
    payload = json.dumps(error_body(exc.message, exc.type, exc.param, exc.code)).encode()
    await send(
        {
            "type": "http.response.start",
            "status": exc.status_code,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})
