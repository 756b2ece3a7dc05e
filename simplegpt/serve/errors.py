"""Errors in OpenAI's format: {"error": {"message", "type", "param", "code"}}, status 400 or 404."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse


class APIError(Exception):
    """An error answered in OpenAI's format: status 400 (a bad request) or 404 (an unknown model);
    param names the request field at fault."""

    def __init__(self, message: str, status: int = 400, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message, self.status, self.param, self.code = message, status, param, code


def add_error_handlers(app: FastAPI) -> None:
    """APIError, and the request bodies pydantic refuses (malformed JSON, a wrong type, an unknown
    field), answered in OpenAI's format; a refused body is a 400, as OpenAI answers it (not 422)."""

    @app.exception_handler(APIError)
    async def api_error(_: Request, e: APIError) -> JSONResponse:
        kind = "not_found_error" if e.status == 404 else "invalid_request_error"
        return JSONResponse({"error": {"message": e.message, "type": kind, "param": e.param, "code": e.code}},
                            status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ())[1:])
        message = f"{where}: {first.get('msg', 'invalid request')}" if where else first.get("msg", "invalid request")
        return JSONResponse({"error": {"message": message, "type": "invalid_request_error", "param": where or None,
                                       "code": None}}, status_code=400)
