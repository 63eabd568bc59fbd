"""OpenAI-shaped errors: {"error": {"message", "type", "param", "code"}} with llama-server's
status for each type. A client's mistake is a 4xx, never a 500."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from moestream.kernels.errors import MoestreamError

log = logging.getLogger(__name__)

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

    def response(self) -> JSONResponse:
        headers = {"Retry-After": str(self.retry_after_s)} if self.retry_after_s is not None else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def bad_request(exc: MoestreamError, param: str | None = None) -> APIError:
    return APIError(str(exc), param=param)


def _validation_error(exc: RequestValidationError) -> APIError:
    first = exc.errors()[0]
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    if first.get("type") == "json_invalid":
        return APIError(f"the request body is not valid JSON: {first.get('msg')}")
    where = ".".join(loc)
    message = first.get("msg", "invalid request")
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

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return APIError(f"internal error: {type(exc).__name__}", "server_error").response()
