"""Errors as JSON: every 4xx/5xx answer is {"error": {"code": <runtime exit code or 0>, "line": "<one line>"}}.

`code` is the mil_runtime.errors exit code of the refusal (6 for a malformed request, 3 for a missing
input, ...), or 0 where the runtime has none (an unknown route, a missing token). No answer carries a
traceback; an unexpected exception is logged by type only and answered 500 with one line.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from mil_runtime.errors import (ContractMismatchError, InputNotFoundError, InvalidInputError, MilkitError,
                                ModelFormatError, MppUnknownError, NoTissueError, OutputBusyError, OutputError,
                                SlideReadError)

log = logging.getLogger("mil_runtime.serve")
MAX_LINE = 500


def one_line(text: object) -> str:
    return " ".join(str(text).split())[:MAX_LINE]


class ApiError(Exception):
    """An HTTP refusal: status, one line, the runtime code (0 when none) and extra headers."""

    def __init__(self, status: int, line: str, code: int = 0, headers: dict[str, str] | None = None) -> None:
        super().__init__(line)
        self.status, self.line, self.code, self.headers = status, one_line(line), code, headers or {}


STATUS_BY_ERROR = [  # most specific first
    (OutputBusyError, 409), (InputNotFoundError, 404), (ModelFormatError, 422), (ContractMismatchError, 422),
    (InvalidInputError, 400), (SlideReadError, 422), (MppUnknownError, 422), (NoTissueError, 422),
    (OutputError, 500),
]


def status_of(exc: MilkitError) -> int:
    for kind, status in STATUS_BY_ERROR:
        if isinstance(exc, kind):
            return status
    return 400


def error_body(code: int, line: str) -> dict:
    return {"error": {"code": int(code), "line": one_line(line)}}


def error_response(status: int, code: int, line: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(code, line), status_code=status, headers=headers)


def milkit_error(exc: MilkitError) -> ApiError:
    return ApiError(status_of(exc), str(exc), exc.exit_code)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api(request: Request, exc: ApiError):
        return error_response(exc.status, exc.code, exc.line, exc.headers)

    @app.exception_handler(MilkitError)
    async def _milkit(request: Request, exc: MilkitError):
        return error_response(status_of(exc), exc.exit_code, str(exc))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        parts = []
        for item in exc.errors()[:3]:
            where = ".".join(str(p) for p in item.get("loc", ()) if p != "body") or "request"
            parts.append(f"{where}: {item.get('msg', 'invalid')}")
        return error_response(422, InvalidInputError.exit_code, "invalid request: " + "; ".join(parts))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        line = exc.detail if isinstance(exc.detail, str) else "request refused"
        return error_response(exc.status_code, 0, line, getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.error("unexpected %s on %s %s", type(exc).__name__, request.method, request.url.path)
        return error_response(500, 1, f"internal error ({type(exc).__name__}); see the server log")
