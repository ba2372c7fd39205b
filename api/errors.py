"""Narrow exceptions, each carrying its HTTP status and RFC 9457 problem slug."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from http import HTTPStatus
from typing import Any, ClassVar

from starlette.exceptions import HTTPException

PROBLEM_CONTENT_TYPE = "application/problem+json"
PROBLEM_TYPE_PREFIX = "urn:orders-api:problem:"


class ProblemError(HTTPException):
    """An expected failure rendered as problem+json by the one handler in `main.py`.

    It subclasses Starlette's HTTPException so FastAPI re-raises it untouched even
    when it surfaces while the request body is being read (the 413 body limit).
    """

    status: ClassVar[int] = 500
    slug: ClassVar[str] = "internal-error"

    def __init__(
        self,
        detail: str | None = None,
        *,
        headers: Mapping[str, str] | None = None,
        errors: Sequence[Mapping[str, Any]] | None = None,
    ) -> None:
        super().__init__(
            status_code=self.status,
            detail=detail or HTTPStatus(self.status).phrase,
            headers=dict(headers) if headers else None,
        )
        self.errors = list(errors) if errors is not None else None

    @property
    def title(self) -> str:
        return HTTPStatus(self.status).phrase


class BadRequest(ProblemError):
    status, slug = 400, "bad-request"


class Unauthorized(ProblemError):
    status, slug = 401, "unauthorized"

    def __init__(self, detail: str = "Missing or invalid credentials.") -> None:
        super().__init__(detail, headers={"WWW-Authenticate": "Bearer"})


class Forbidden(ProblemError):
    status, slug = 403, "forbidden"


class NotFound(ProblemError):
    status, slug = 404, "not-found"


class MethodNotAllowed(ProblemError):
    status, slug = 405, "method-not-allowed"


class Conflict(ProblemError):
    status, slug = 409, "conflict"


class InvalidTransition(ProblemError):
    status, slug = 409, "invalid-transition"


class IdempotencyKeyInUse(ProblemError):
    status, slug = 409, "idempotency-key-in-use"


class PreconditionFailed(ProblemError):
    status, slug = 412, "precondition-failed"


class PayloadTooLarge(ProblemError):
    status, slug = 413, "payload-too-large"


class ValidationFailed(ProblemError):
    status, slug = 422, "validation-error"


class IdempotencyKeyReused(ProblemError):
    status, slug = 422, "idempotency-key-reused"


class RateLimited(ProblemError):
    status, slug = 429, "rate-limited"


class InternalError(ProblemError):
    status, slug = 500, "internal-error"


class BadGateway(ProblemError):
    status, slug = 502, "bad-gateway"


class ServiceUnavailable(ProblemError):
    status, slug = 503, "service-unavailable"


class UpstreamTimeout(ProblemError):
    status, slug = 504, "upstream-timeout"


# Starlette raises plain HTTPExceptions for routing failures; map their status to our slugs.
SLUG_BY_STATUS: dict[int, str] = {
    cls.status: cls.slug
    for cls in (
        BadRequest,
        Unauthorized,
        Forbidden,
        NotFound,
        MethodNotAllowed,
        Conflict,
        PreconditionFailed,
        PayloadTooLarge,
        ValidationFailed,
        RateLimited,
        InternalError,
        BadGateway,
        ServiceUnavailable,
        UpstreamTimeout,
    )
}


def problem_body(
    *,
    status: int,
    slug: str,
    detail: str,
    instance: str,
    request_id: str | None,
    errors: Sequence[Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "type": PROBLEM_TYPE_PREFIX + slug,
        "title": HTTPStatus(status).phrase,
        "status": status,
        "detail": detail,
        "instance": instance,
        "request_id": request_id,
    }
    if errors is not None:
        body["errors"] = list(errors)
    return body
