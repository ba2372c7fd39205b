"""The one assertion of an RFC 9457 problem+json response, shared by every test module."""

from __future__ import annotations

from typing import Any

import httpx

PROBLEM = "application/problem+json"
PROBLEM_TYPE = "urn:orders-api:problem:"
# Every member `api.errors.problem_body` writes; `errors` is added for validation failures.
PROBLEM_KEYS = {"type", "title", "status", "detail", "instance", "request_id"}

# SPEC §3's list, written out.
CONTRACT_SLUGS = {
    "validation-error",
    "unauthorized",
    "forbidden",
    "not-found",
    "conflict",
    "invalid-transition",
    "idempotency-key-reused",
    "idempotency-key-in-use",
    "precondition-failed",
    "rate-limited",
    "payload-too-large",
    "service-unavailable",
    "bad-gateway",
    "upstream-timeout",
    "internal-error",
    "method-not-allowed",
    "bad-request",
    "unsupported-media-type",
}


def assert_problem(response: httpx.Response, status: int, slug: str) -> dict[str, Any]:
    """The response is exactly an RFC 9457 problem with this status and slug; its body."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM, response.headers
    body: dict[str, Any] = response.json()
    assert set(body) - {"errors"} == PROBLEM_KEYS, body
    assert body["type"] == PROBLEM_TYPE + slug, body
    assert body["status"] == status, body
    assert body["request_id"] == response.headers["x-request-id"], body
    return body
