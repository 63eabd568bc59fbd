"""/openapi.json as the server answers: 400 for a bad body (FastAPI would say 422), each
route's errors in OpenAI's shape, and text/event-stream where `stream: true` applies."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

_ERROR = {"$ref": "#/components/schemas/Error"}
_ERROR_SCHEMA = {
    "type": "object", "required": ["error"],
    "properties": {"error": {
        "type": "object", "required": ["message", "type", "param", "code"],
        "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                       "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}},
}
_WHY = {
    "400": "invalid_request_error: a malformed body, a bad value, a prompt longer than the context",
    "401": "authentication_error: the API key is missing or wrong",
    "404": "not_found_error: no such model",
    "408": "invalid_request_error: the body did not arrive within --request-timeout",
    "413": "invalid_request_error: the body is larger than --max-request-bytes",
    "500": "server_error: a fault of the server (the log has its traceback)",
    "503": "unavailable_error: loading, shutting down, or the queue is full (see Retry-After)",
}
_GENERATION = ("400", "401", "404", "408", "413", "500", "503")
_ERRORS = {
    ("post", "/v1/chat/completions"): _GENERATION,
    ("post", "/v1/completions"): _GENERATION,
    ("get", "/v1/models"): ("401", "503"),
    ("get", "/v1/models/{model}"): ("401", "404", "503"),
    ("get", "/health"): ("503",),
}
_STREAMS = {"/v1/chat/completions", "/v1/completions"}


def install_openapi(app: FastAPI) -> None:
    def openapi() -> dict:
        if app.openapi_schema is None:
            app.openapi_schema = _describe(app)
        return app.openapi_schema

    app.openapi = openapi


def _describe(app: FastAPI) -> dict:
    schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for unused in ("HTTPValidationError", "ValidationError"):
        components.pop(unused, None)
    components["Error"] = _ERROR_SCHEMA
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            responses = operation["responses"]
            responses.pop("422", None)
            for status in _ERRORS.get((method, path), ()):
                responses[status] = {"description": _WHY[status],
                                     "content": {"application/json": {"schema": _ERROR}}}
            if path in _STREAMS:
                responses["200"]["description"] = ("the completion; with `stream: true`, server-sent "
                                                   "events ending with `data: [DONE]`")
                responses["200"]["content"]["text/event-stream"] = {"schema": {"type": "string"}}
    return schema
