"""Every error as RFC 9457 problem+json (SPEC §3): the body, the one handler, the outer layer."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from api.errors import (
    SLUG_BY_STATUS,
    InvalidTransition,
    PayloadTooLarge,
    ProblemError,
    Unauthorized,
    malformed_json,
    problem_body,
    problem_instance,
)
from api.main import handle_http_error
from api.middleware import RequestContextMiddleware
from tests.problems import CONTRACT_SLUGS, PROBLEM, PROBLEM_KEYS, assert_problem

LIMIT = 1024


def _subclasses(cls: type[ProblemError]) -> set[type[ProblemError]]:
    found = set(cls.__subclasses__())
    for sub in list(found):
        found |= _subclasses(sub)
    return found


def test_the_error_classes_carry_exactly_the_contracts_slugs() -> None:
    assert {cls.slug for cls in _subclasses(ProblemError)} == CONTRACT_SLUGS
    # A plain HTTPException (a routing failure) gets the slug of its status.
    for status, slug in SLUG_BY_STATUS.items():
        assert any(cls.status == status and cls.slug == slug for cls in _subclasses(ProblemError))


def test_the_body_has_the_rfc_9457_members_and_errors_only_when_given() -> None:
    body = problem_body(
        status=409, slug="conflict", detail="Taken.", instance="/v1/x", request_id="r-1"
    )
    assert body == {
        "type": "urn:orders-api:problem:conflict",
        "title": "Conflict",
        "status": 409,
        "detail": "Taken.",
        "instance": "/v1/x",
        "request_id": "r-1",
    }
    errors = [{"loc": ["body", "items"], "msg": "too short", "type": "too_short"}]
    with_errors = problem_body(
        status=422,
        slug="validation-error",
        detail="Invalid.",
        instance="/",
        request_id=None,
        errors=errors,
    )
    assert set(with_errors) == {*PROBLEM_KEYS, "errors"}
    assert with_errors["errors"] == errors


def test_an_error_without_a_detail_says_its_status_phrase() -> None:
    assert InvalidTransition().detail == "Conflict"
    assert InvalidTransition("From shipped to paid.").detail == "From shipped to paid."
    assert Unauthorized().headers == {"WWW-Authenticate": "Bearer"}


def test_malformed_json_is_one_422_validation_error_on_the_body() -> None:
    problem = malformed_json("expected value at byte 3")
    assert (problem.status_code, problem.slug) == (422, "validation-error")
    assert problem.errors == [
        {"loc": ["body"], "msg": "Invalid JSON: expected value at byte 3", "type": "json_invalid"}
    ]


@pytest.mark.parametrize(
    ("scope", "instance"),
    [
        ({"raw_path": b"/v1/orders/abc", "path": "/v1/orders/abc"}, "/v1/orders/abc"),
        # Some servers put the query string in raw_path: it is not part of the instance.
        ({"raw_path": b"/v1/orders?limit=1", "path": "/v1/orders"}, "/v1/orders"),
        # As sent: the client's escapes are kept, what is not a URI character is escaped.
        ({"raw_path": b"/v1/a%20b", "path": "/v1/a b"}, "/v1/a%20b"),
        ({"raw_path": b"/v1/a b", "path": "/v1/a b"}, "/v1/a%20b"),
        ({"raw_path": b"/v1/100%", "path": "/v1/100%"}, "/v1/100%25"),
        ({"raw_path": b'/v1/"<x>"', "path": '/v1/"<x>"'}, "/v1/%22%3Cx%3E%22"),
        ({"raw_path": "/v1/é".encode(), "path": "/v1/é"}, "/v1/%C3%A9"),
        ({"path": "/v1/é"}, "/v1/%C3%A9"),
    ],
)
def test_the_instance_is_the_path_as_sent_percent_encoded(
    scope: dict[str, Any], instance: str
) -> None:
    assert problem_instance(scope) == instance


# --- through the outer middleware and the one handler ------------------------------------


def problem_app() -> FastAPI:
    """The service's outer layer and its HTTPException handler around three routes."""
    app = FastAPI()
    app.add_middleware(RequestContextMiddleware, max_body_bytes=LIMIT)
    app.add_exception_handler(StarletteHTTPException, handle_http_error)

    @app.post("/echo")
    async def echo(request: Request) -> Response:
        return Response(await request.body())

    @app.post("/orders/{order_id}/pay")
    async def pay(order_id: str) -> Response:
        raise InvalidTransition(f"Order {order_id} is shipped.")

    @app.get("/boom")
    async def boom() -> Response:
        raise RuntimeError("password=hunter2 in a trace nobody should see")

    return app


@pytest.fixture
async def app_client() -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=problem_app())
    async with httpx.AsyncClient(transport=transport, base_url="http://unit") as client:
        yield client


async def _chunks(total: int) -> AsyncIterator[bytes]:
    for _ in range(total // 256):
        yield b"x" * 256


async def test_a_problem_error_is_rendered_with_its_status_slug_and_request_id(
    app_client: httpx.AsyncClient,
) -> None:
    response = await app_client.post("/orders/o-1/pay", headers={"X-Request-ID": "req-42"})
    body = assert_problem(response, 409, "invalid-transition")
    assert body["detail"] == "Order o-1 is shipped."
    assert body["instance"] == "/orders/o-1/pay"
    assert body["request_id"] == "req-42"


async def test_a_routing_failure_is_a_problem_too(app_client: httpx.AsyncClient) -> None:
    assert_problem(await app_client.get("/nowhere"), 404, "not-found")
    response = await app_client.get("/echo")
    assert_problem(response, 405, "method-not-allowed")
    assert response.headers["allow"] == "POST"


async def test_a_declared_body_over_the_limit_is_413_before_the_app_sees_it(
    app_client: httpx.AsyncClient,
) -> None:
    response = await app_client.post("/echo", content=b"x" * (LIMIT + 1))
    body = assert_problem(response, 413, "payload-too-large")
    assert body["detail"] == f"Request bodies are limited to {LIMIT} bytes."
    assert response.headers["connection"] == "close"


async def test_a_streamed_body_is_counted_and_refused_once_over_the_limit(
    app_client: httpx.AsyncClient,
) -> None:
    response = await app_client.post("/echo", content=_chunks(LIMIT + 256))
    assert "content-length" not in response.request.headers  # really streamed
    assert_problem(response, 413, "payload-too-large")


async def test_bodies_up_to_the_limit_pass(app_client: httpx.AsyncClient) -> None:
    assert (await app_client.post("/echo", content=b"x" * LIMIT)).content == b"x" * LIMIT
    streamed = await app_client.post("/echo", content=_chunks(LIMIT))
    assert streamed.content == b"x" * LIMIT


async def test_an_unexpected_error_is_a_bare_500_problem_without_the_trace(
    app_client: httpx.AsyncClient,
) -> None:
    response = await app_client.get("/boom")
    body = assert_problem(response, 500, "internal-error")
    assert body["detail"] == "An unexpected error occurred."
    assert "hunter2" not in response.text
    assert "Traceback" not in response.text


@pytest.mark.parametrize("sent", ["", "has space", "x" * 129, "semi;colon"])
async def test_an_unusable_request_id_is_replaced_by_a_random_uuid(
    app_client: httpx.AsyncClient, sent: str
) -> None:
    response = await app_client.get("/nowhere", headers={"X-Request-ID": sent})
    generated = response.headers["x-request-id"]
    assert uuid.UUID(generated).version == 4
    assert str(uuid.UUID(generated)) == generated
    assert response.json()["request_id"] == generated
    assert response.headers["content-type"] == PROBLEM


def test_the_413_error_is_an_http_exception_so_the_framework_re_raises_it() -> None:
    # FastAPI turns anything else raised while it reads a body into a 400.
    assert issubclass(PayloadTooLarge, StarletteHTTPException)
