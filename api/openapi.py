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
JSON_CONTENT_TYPE = "application/json"
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
    if JSON_CONTENT_TYPE in operation.get("requestBody", {}).get("content", {}):
        statuses[415] = "The request body's Content-Type is not JSON."
    if "requestBody" in operation or operation.get("parameters"):
        statuses[422] = "The request is not valid."
    if path.startswith("/v1/") and path not in UNLIMITED_V1_PATHS:
        statuses[429] = "The caller's rate-limit bucket is empty; see `Retry-After`."
        statuses[503] = "A backing service is unavailable; retry shortly."
    return statuses


def complete_operation(path: str, method: str, operation: dict[str, Any]) -> None:
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
            content[PROBLEM_CONTENT_TYPE] = {
                "schema": {"$ref": PROBLEM_REF},
                "examples": problem_examples(path, method, int(code)),
            }


# What each problem a client can receive looks like: (slug, detail[, errors]) per status,
# and the operations whose 409 or 422 means something more specific.
_PROBLEMS_BY_STATUS: dict[int, list[tuple[str, str]]] = {
    400: [("bad-request", "The request could not be understood.")],
    401: [("unauthorized", "Missing or invalid credentials.")],
    403: [("forbidden", "Only an admin may change an order's status.")],
    404: [("not-found", "No order with this id.")],
    409: [("conflict", "The request conflicts with the resource's current state.")],
    412: [("precondition-failed", 'The order is no longer at version "1-3f1c9a6e…".')],
    413: [("payload-too-large", "Request bodies are limited to 1048576 bytes.")],
    415: [("unsupported-media-type", "The request body must be application/json; got text/plain.")],
    422: [("validation-error", "The request is not valid.")],
    429: [("rate-limited", "Too many requests for policy 'default'; retry after 2 s.")],
    500: [("internal-error", "An unexpected error occurred.")],
    502: [("bad-gateway", "The service 'inventory' sent a reply that is not valid.")],
    503: [("service-unavailable", "A backing service is unavailable; retry shortly.")],
    504: [("upstream-timeout", "The service 'inventory' did not reply within 5 s.")],
}
_PROBLEMS_BY_OPERATION: dict[tuple[str, str, int], list[tuple[str, str]]] = {
    ("post", "/v1/auth/register", 409): [
        ("conflict", "An account with this email already exists.")
    ],
    ("post", "/v1/orders", 409): [
        (
            "idempotency-key-in-use",
            "A request with this Idempotency-Key is still being processed; retry shortly.",
        )
    ],
    ("post", "/v1/orders", 422): [
        ("validation-error", "The request is not valid."),
        (
            "idempotency-key-reused",
            "This Idempotency-Key was used with a different request body.",
        ),
    ],
    ("post", "/v1/orders/{order_id}/cancel", 409): [
        ("invalid-transition", "An order that is shipped cannot become cancelled.")
    ],
    ("patch", "/v1/orders/{order_id}", 409): [
        ("invalid-transition", "An order that is delivered cannot become paid.")
    ],
}
_VALIDATION_ERRORS = [
    {
        "loc": ["body", "items", 0, "quantity"],
        "msg": "Input should be greater than or equal to 1",
        "type": "greater_than_equal",
    }
]
_MALFORMED_JSON_ERRORS = [
    {
        "loc": ["body"],
        "msg": "Invalid JSON: Expecting ',' delimiter at byte 18",
        "type": "json_invalid",
    }
]
EXAMPLE_PATH_VALUES = {
    "{order_id}": "3f1c9a6e-8d2b-4c55-9e1a-2b7d4f0c8a91",
    "{service}": "inventory",
    "{path}": "items/42",
}
EXAMPLE_REQUEST_ID = "7b0c5f1e-2a4d-4e8f-9c3b-1d6a8e2f4b70"


def _example_instance(path: str) -> str:
    for template, value in EXAMPLE_PATH_VALUES.items():
        path = path.replace(template, value)
    return path


def problem_examples(path: str, method: str, status: int) -> dict[str, Any]:
    """Named examples of the problem bodies `method path` answers with `status`."""
    problems = _PROBLEMS_BY_OPERATION.get((method, path, status)) or _PROBLEMS_BY_STATUS.get(
        status, [("bad-request", HTTPStatus(status).phrase)]
    )
    examples: dict[str, Any] = {}
    for slug, detail in problems:
        value: dict[str, Any] = {
            "type": PROBLEM_TYPE_PREFIX + slug,
            "title": HTTPStatus(status).phrase,
            "status": status,
            "detail": detail,
            "instance": _example_instance(path),
            "request_id": EXAMPLE_REQUEST_ID,
        }
        if slug == "validation-error":
            examples["malformed-json"] = {
                "summary": "The body is not JSON",
                "value": {
                    **value,
                    "detail": "The request body is not valid JSON.",
                    "errors": _MALFORMED_JSON_ERRORS,
                },
            }
            value["errors"] = _VALIDATION_ERRORS
        examples[slug] = {"summary": f"{status} {slug}", "value": value}
    return examples


def _bodies(operation: dict[str, Any]) -> list[dict[str, Any]]:
    """The request body and success response media types of an operation."""
    media = list(operation.get("requestBody", {}).get("content", {}).values())
    for code, response in operation.get("responses", {}).items():
        if code.startswith("2"):
            media.extend(response.get("content", {}).values())
    return media


def add_model_examples(paths: dict[str, Any], schemas: dict[str, Any]) -> None:
    """Copy each body model's examples onto its media types, where Swagger UI looks."""
    for operations in paths.values():
        for operation in operations.values():
            for media in _bodies(operation):
                ref = media.get("schema", {}).get("$ref", "")
                model = schemas.get(ref.rsplit("/", 1)[-1], {}) if isinstance(ref, str) else {}
                if model.get("examples") and "examples" not in media:
                    media["examples"] = {
                        f"example-{index}": {"value": example}
                        for index, example in enumerate(model["examples"], start=1)
                    }


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
        for method, operation in operations.items():
            complete_operation(path, method, operation)
    add_order_links(document.get("paths", {}))
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    add_model_examples(document.get("paths", {}), schemas)
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
