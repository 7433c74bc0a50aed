"""The server's error type and its OpenAI-style JSON body (its own module: the routes of api_server.py and
admin.py both raise it)."""
from fastapi.responses import JSONResponse


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def error_response(status: int, message: str) -> JSONResponse:
    kind = {400: "BadRequestError", 401: "AuthenticationError", 403: "PermissionDeniedError",
            404: "NotFoundError", 409: "ConflictError", 413: "RequestTooLargeError",
            501: "NotImplementedError"}.get(status, "InternalServerError" if status >= 500 else "BadRequestError")
    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": status}}, status)
