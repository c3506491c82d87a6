"""The OpenAI-compatible HTTP API (docs/architecture.md, "Flow 1: one request").

- `app`: `create_app()`, the FastAPI application and its thin routes
- `protocol`: pydantic request / response models
- `completions`: what POST /v1/completions does behind its route
- `detokenize`: incremental detokenization and stop strings
- `errors`: the OpenAI error format, exception handlers, body size limit
- `deps`: server state and the `Annotated` dependencies routes share
- `admin` (when present): operator routes, included by `app`"""
