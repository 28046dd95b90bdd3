"""The one error type of the serving core. Handlers, the data plane and the codecs raise it; each
front-end maps it once: HTTP status + ``{"error": ..., "field": ...}`` body, gRPC status code."""

from __future__ import annotations


class ServingError(Exception):
    """A request the server refuses, naming the field to blame where there is one.

    ``status`` is the HTTP status; gRPC maps it (400 INVALID_ARGUMENT, 401 UNAUTHENTICATED,
    404 NOT_FOUND, 413 INVALID_ARGUMENT, 503 UNAVAILABLE, 500 INTERNAL). ``retry_after`` (seconds) goes out as the
    ``Retry-After`` header when the server is only busy."""

    def __init__(self, field: str | None, message: str, status: int = 400, retry_after: float | None = None,
                 details: dict | None = None):
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field
        self.message = message
        self.status = status
        self.retry_after = retry_after
        self.details = details  # figures behind the refusal (a rollout's measured agreement), in the body

    def to_json(self) -> dict:
        body = {"error": str(self)}
        if self.field:
            body["field"] = self.field
        if self.details:
            body["details"] = self.details
        return body


def bad_request(field: str | None, message: str) -> ServingError:
    return ServingError(field, message, 400)


def unauthorized(message: str) -> ServingError:
    return ServingError("authorization", message, 401)


def not_found(field: str, message: str) -> ServingError:
    return ServingError(field, message, 404)


def too_large(field: str, message: str) -> ServingError:
    return ServingError(field, message, 413)


def unsupported_media(field: str, message: str) -> ServingError:
    return ServingError(field, message, 415)


def unavailable(field: str | None, message: str, retry_after: float | None = None) -> ServingError:
    return ServingError(field, message, 503, retry_after)
