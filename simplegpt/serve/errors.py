"""Errors in OpenAI's format: {"error": {"message", "type", "param", "code"}}, whatever went wrong:
a refused field (400), a missing key (401), an unknown model or route (404), a body too large
(413), a full queue (429), a request past its time (504)."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error", 429: "rate_limit_error",
         503: "server_error", 504: "timeout_error"}


class APIError(Exception):
    """An error answered in OpenAI's format with `status` (400 by default); param names the request
    field at fault; headers go with the response (Retry-After for a 429)."""

    def __init__(self, message: str, status: int = 400, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message, self.status, self.param, self.code, self.headers = message, status, param, code, headers


def error_body(message: str, status: int, param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's error object for a status."""
    kind = TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(e: APIError) -> JSONResponse:
    return JSONResponse(error_body(e.message, e.status, e.param, e.code), status_code=e.status, headers=e.headers)


def add_error_handlers(app: FastAPI) -> None:
    """APIError, the request bodies pydantic refuses (malformed JSON, a wrong type, an unknown
    field) and Starlette's own errors (an unknown route, a wrong method, a body that cannot be
    parsed at all: invalid UTF-8, JSON nested too deep) answered in OpenAI's format; a
    refused body is a 400, as OpenAI answers it (not 422)."""

    @app.exception_handler(APIError)
    async def api_error(_: Request, e: APIError) -> JSONResponse:
        return error_response(e)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ())[1:])
        message = f"{where}: {first.get('msg', 'invalid request')}" if where else first.get("msg", "invalid request")
        return JSONResponse(error_body(message, 400, where or None), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, e: HTTPException) -> JSONResponse:
        return JSONResponse(error_body(str(e.detail), e.status_code), status_code=e.status_code, headers=e.headers)
