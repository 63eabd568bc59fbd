"""OpenAI-shaped errors: {"error": {"message", "type", "param", "code"}} with llama-server's
status for each type. A client's mistake is a 4xx, never a 500; a server fault is one
traceback in the log and a 500 on a connection that stays usable."""

from __future__ import annotations

import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from moestream.engine.engine import PromptTooLong
from moestream.kernels.errors import MoestreamError

log = logging.getLogger(__name__)


class ErrorResponse(JSONResponse):
    """ASCII JSON: an error message may quote the client's text, which can be anything."""

    def render(self, content) -> bytes:
        return json.dumps(content, separators=(",", ":")).encode("ascii")


STATUS_OF_TYPE = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "not_found_error": 404,
    "server_error": 500,
    "unavailable_error": 503,
}


class APIError(Exception):
    def __init__(self, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, status: int | None = None, retry_after_s: int | None = None):
        super().__init__(message)
        self.message, self.type, self.param, self.code = message, type, param, code
        self.status = status if status is not None else STATUS_OF_TYPE[type]
        self.retry_after_s = retry_after_s

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}

    def response(self, close: bool = False) -> JSONResponse:
        """`close`: end the connection after it (the request's body was not read)."""
        headers = {"Retry-After": str(self.retry_after_s)} if self.retry_after_s is not None else {}
        if close:
            headers["Connection"] = "close"
        return ErrorResponse(self.body(), status_code=self.status, headers=headers)


def bad_request(exc: MoestreamError, param: str | None = None) -> APIError:
    """A 400 for a request the engine refused (OpenAI's code for a prompt too long)."""
    code = "context_length_exceeded" if isinstance(exc, PromptTooLong) else None
    return APIError(str(exc), param=param, code=code)


def _validation_error(exc: RequestValidationError) -> APIError:
    first = exc.errors()[0]
    # Without "body" and pydantic's own steps ("function-after[...]", "list[TextPart]").
    loc = [str(part) for part in first.get("loc", ()) if part != "body" and "[" not in str(part)]
    if first.get("type") == "json_invalid":
        return APIError(f"the request body is not valid JSON: {first.get('msg')}")
    where = ".".join(loc)
    message = first.get("msg", "invalid request").removeprefix("Value error, ")
    # param names the top-level field; the message keeps the full path.
    return APIError(f"{where}: {message}" if where else message, param=loc[0] if loc else None)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def on_api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            error = APIError(f"no route {request.method} {request.url.path}", "not_found_error")
        else:
            error = APIError(str(exc.detail), status=exc.status_code)
        return error.response()


class CatchAll:
    """ASGI middleware, outside the others: an exception no handler took is logged once with
    its traceback and answered with a 500 in OpenAI's shape. It stops here, so neither
    Starlette nor uvicorn logs it again or drops the keep-alive connection."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_tracking(message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, send_tracking)
        except Exception as exc:
            log.exception("unhandled error on %s %s", scope["method"], scope["path"])
            if not started:  # else the response is cut short and uvicorn closes the connection
                error = APIError(f"internal server error ({type(exc).__name__}); the server log has "
                                 "the details", "server_error")
                await error.response()(scope, receive, send)
