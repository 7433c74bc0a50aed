"""The server's error type, its OpenAI-style JSON body, and the handlers that give every error that body (ours,
FastAPI's own 404 / 405 / 422, and anything unexpected). Its own module: api_server.py, admin.py and the
middlewares all raise or answer these."""
import logging
from collections.abc import Mapping

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

log = logging.getLogger("engine.serve")
KINDS = {400: "BadRequestError", 401: "AuthenticationError", 403: "PermissionDeniedError", 404: "NotFoundError",
         405: "MethodNotAllowedError", 409: "ConflictError", 413: "RequestTooLargeError",
         415: "UnsupportedMediaTypeError", 429: "RateLimitError", 501: "NotImplementedError",
         503: "ServiceUnavailableError"}


class ApiError(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


def error_response(status: int, message: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    kind = KINDS.get(status, "InternalServerError" if status >= 500 else "BadRequestError")
    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": status}}, status,
                        headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError) -> JSONResponse:
        return error_response(e.status, e.message, e.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:  # unknown route, wrong method
        return error_response(e.status_code, f"{request.method} {request.url.path}: {e.detail}", e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_parameters(request: Request, e: RequestValidationError) -> JSONResponse:  # typed query parameters
        problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
        return error_response(400, f"invalid request: {problems}")

    @app.exception_handler(Exception)
    async def unexpected(request: Request, e: Exception) -> JSONResponse:
        log.exception("unexpected error in %s %s", request.method, request.url.path)
        return error_response(500, f"internal error ({type(e).__name__}); the server keeps serving")
