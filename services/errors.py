"""Client errors that name the offending field; every protocol maps them to its own status codes."""

from __future__ import annotations


class RequestError(Exception):
    """Bad input: HTTP 400 / gRPC INVALID_ARGUMENT unless ``status`` says otherwise."""

    def __init__(self, field: str, message: str, status: int = 400):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message
        self.status = status

    def to_json(self) -> dict:
        return {"error": str(self), "field": self.field}


class NotFoundError(RequestError):
    def __init__(self, field: str, message: str):
        super().__init__(field, message, status=404)


class NotReadyError(RequestError):
    def __init__(self, field: str, message: str):
        super().__init__(field, message, status=503)
