"""The OpenAI-compatible HTTP API (docs/architecture.md, "Flow 1: one request").

- `app`: `create_app()`, the FastAPI application and its thin routes
- `protocol`: pydantic request / response models (shared fields, completions, models, errors)
- `chat_protocol`: the chat completions models (text messages only)
- `generation`: what both generation endpoints share (checks, one engine sequence per choice, SSE)
- `completions`: what POST /v1/completions does behind its route
- `chat`: what POST /v1/chat/completions does behind its route (the model's chat template)
- `detokenize`: incremental detokenization, stop strings, token bytes
- `errors`: the OpenAI error format, exception handlers, body size limit
- `deps`: server state and the `Annotated` dependencies routes share
- `admin` (when present): operator routes, included by `app`"""
