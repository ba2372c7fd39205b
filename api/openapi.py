"""The OpenAPI document, completed with the problem+json answers every route can give.

FastAPI documents a route's success response and a 422 in its own `{detail}` shape.
The service answers every error as RFC 9457 problem+json (SPEC §3), and some of them
come from layers a route does not declare (bearer auth, rate limits, the body cap,
an unreachable dependency). This adds them once, from the operation's traits, so the
document tells a client every status it can receive and the body that comes with it.
"""

from __future__ import annotations

from collections.abc import Callable
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI

from api.errors import PROBLEM_CONTENT_TYPE, PROBLEM_TYPE_PREFIX

PROBLEM_REF = "#/components/schemas/Problem"
# Routes outside every rate-limit policy and dependency (SPEC §6: reading it costs no token).
UNLIMITED_V1_PATHS = frozenset({"/v1/rate-limits"})

PROBLEM_SCHEMA: dict[str, Any] = {
    "title": "Problem",
    "description": "An RFC 9457 problem; validation errors add `errors`.",
    "type": "object",
    "required": ["type", "title", "status", "detail", "instance", "request_id"],
    "properties": {
        "type": {"type": "string", "pattern": f"^{PROBLEM_TYPE_PREFIX}[a-z-]+$"},
        "title": {"type": "string"},
        "status": {"type": "integer", "minimum": 400, "maximum": 599},
        "detail": {"type": "string"},
        "instance": {"type": "string"},
        "request_id": {"type": "string"},
        "errors": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["loc", "msg", "type"],
                "properties": {
                    "loc": {"type": "array", "items": {"type": ["string", "integer"]}},
                    "msg": {"type": "string"},
                    "type": {"type": "string"},
                },
            },
        },
    },
}


def problem_response(status: int, description: str | None = None) -> dict[str, Any]:
    """An OpenAPI response object for a problem+json answer with `status`."""
    return {
        "description": description or HTTPStatus(status).phrase,
        "content": {PROBLEM_CONTENT_TYPE: {"schema": {"$ref": PROBLEM_REF}}},
    }


def implied_statuses(path: str, operation: dict[str, Any]) -> dict[int, str]:
    """Statuses the layers around a route can answer for this operation, with why."""
    statuses: dict[int, str] = {}
    if operation.get("security"):
        statuses[401] = "Missing, malformed or expired bearer token."
    if "requestBody" in operation:
        statuses[413] = "The request body is over 1 MiB."
    if "requestBody" in operation or operation.get("parameters"):
        statuses[422] = "The request is not valid."
    if path.startswith("/v1/") and path not in UNLIMITED_V1_PATHS:
        statuses[429] = "The caller's rate-limit bucket is empty; see `Retry-After`."
        statuses[503] = "A backing service is unavailable; retry shortly."
    return statuses


def complete_operation(path: str, operation: dict[str, Any]) -> None:
    """Problem bodies on every error response, plus the statuses implied by the route."""
    responses: dict[str, Any] = operation.setdefault("responses", {})
    for status, description in implied_statuses(path, operation).items():
        responses.setdefault(str(status), {"description": description})
    for code, response in responses.items():
        if not (code.isdigit() and int(code) >= 400):
            continue
        content: dict[str, Any] = response.setdefault("content", {})
        if _is_fastapi_validation_error(content):
            del content["application/json"]  # FastAPI's own 422 shape is never sent
        # Errors without a declared body, or declared as problem+json without its schema.
        if not content or PROBLEM_CONTENT_TYPE in content:
            content[PROBLEM_CONTENT_TYPE] = {"schema": {"$ref": PROBLEM_REF}}


def _is_fastapi_validation_error(content: dict[str, Any]) -> bool:
    ref = content.get("application/json", {}).get("schema", {}).get("$ref", "")
    return isinstance(ref, str) and ref.endswith("/HTTPValidationError")


# An order in a response leads to the operations on that order (OpenAPI links).
ORDER_PATH = "/v1/orders/{order_id}"
ORDER_LINK_TARGETS = {
    "ReadOrder": (ORDER_PATH, "get"),
    "CancelOrder": (f"{ORDER_PATH}/cancel", "post"),
    "ChangeOrderStatus": (ORDER_PATH, "patch"),
}
ORDER_RESPONSES = [
    ("/v1/orders", "post", "201"),
    (ORDER_PATH, "get", "200"),
    (f"{ORDER_PATH}/cancel", "post", "200"),
    (ORDER_PATH, "patch", "200"),
]


def add_order_links(paths: dict[str, Any]) -> None:
    """Link every response that carries an order to reading, cancelling and moving it."""
    links = {
        name: {
            "operationId": paths[path][method]["operationId"],
            "parameters": {"order_id": "$response.body#/id"},
        }
        for name, (path, method) in ORDER_LINK_TARGETS.items()
        if method in paths.get(path, {})
    }
    for path, method, status in ORDER_RESPONSES:
        response = paths.get(path, {}).get(method, {}).get("responses", {}).get(status)
        if response is not None:
            response["links"] = links


def complete_document(document: dict[str, Any]) -> dict[str, Any]:
    """Complete every operation of `document` in place and return it."""
    for path, operations in document.get("paths", {}).items():
        for operation in operations.values():
            complete_operation(path, operation)
    add_order_links(document.get("paths", {}))
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    schemas["Problem"] = PROBLEM_SCHEMA
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)
    return document


def install(app: FastAPI) -> None:
    """Serve the completed document at the app's `openapi_url`."""
    build: Callable[[], dict[str, Any]] = app.openapi

    def openapi() -> dict[str, Any]:
        document = build()  # FastAPI's, cached until the routes change
        if "Problem" not in document.get("components", {}).get("schemas", {}):
            complete_document(document)
        return document

    app.openapi = openapi  # type: ignore[method-assign]
