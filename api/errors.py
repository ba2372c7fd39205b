"""Narrow exceptions, each carrying its HTTP status and RFC 9457 problem slug."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from http import HTTPStatus
from typing import Any, ClassVar
from urllib.parse import quote

from starlette.exceptions import HTTPException
from starlette.responses import Response
from starlette.types import Scope

from api.helpers.orjson_coder import dumps

PROBLEM_CONTENT_TYPE = "application/problem+json"
PROBLEM_TYPE_PREFIX = "urn:orders-api:problem:"


class ProblemError(HTTPException):
    """An expected failure, rendered as problem+json by `problem_response`.

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


class UnsupportedMediaType(ProblemError):
    status, slug = 415, "unsupported-media-type"


class ValidationFailed(ProblemError):
    status, slug = 422, "validation-error"


def malformed_json(reason: str | None = None) -> ValidationFailed:
    """The one answer to a body that is not JSON (SPEC §3: a 422 `validation-error`)."""
    msg = f"Invalid JSON: {reason}" if reason else "Invalid JSON"
    return ValidationFailed(
        "The request body is not valid JSON.",
        errors=[{"loc": ["body"], "msg": msg, "type": "json_invalid"}],
    )


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
        UnsupportedMediaType,
        ValidationFailed,
        RateLimited,
        InternalError,
        BadGateway,
        ServiceUnavailable,
        UpstreamTimeout,
    )
}


# RFC 3986 `pchar` plus `/`: what a path may hold unencoded. `%` stays, so the
# escapes the client sent are kept as they were.
_PATH_SAFE = "/:@!$&'()*+,;=-._~%"
_STRAY_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")


def problem_instance(scope: Scope) -> str:
    """The request path as it was sent, percent-encoded: always a valid URI reference."""
    raw = scope.get("raw_path")
    if raw:
        # Some servers and test transports put the query string in `raw_path` too.
        path = bytes(raw).partition(b"?")[0].decode("latin-1")
    else:
        path = quote(str(scope["path"]), safe="/")
    # Latin-1 both ways: each byte as sent comes back as its own %XX (UTF-8 would encode
    # the decoded bytes a second time).
    return quote(_STRAY_PERCENT.sub("%25", path), safe=_PATH_SAFE, encoding="latin-1")


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


def problem_response(scope: Scope, exc: HTTPException) -> Response:
    """`exc` as RFC 9457 problem+json: every error response of the service is made here.

    `exc` is one of ours, or a Starlette `HTTPException` (routing, the 405), whose
    status picks the slug. The request id is the one the outer middleware assigned.
    """
    status = exc.status_code
    if isinstance(exc, ProblemError):
        slug, errors = exc.slug, exc.errors
    else:
        slug, errors = SLUG_BY_STATUS.get(status, "bad-request"), None
    body = problem_body(
        status=status,
        slug=slug,
        detail=str(exc.detail),
        instance=problem_instance(scope),
        request_id=scope.get("state", {}).get("request_id"),
        errors=errors,
    )
    return Response(
        dumps(body), status_code=status, headers=exc.headers, media_type=PROBLEM_CONTENT_TYPE
    )
