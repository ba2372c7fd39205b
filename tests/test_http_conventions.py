"""HTTP conventions a client relies on (SPEC §3): HEAD, 415, malformed JSON, `instance`."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable

import httpx
import pytest
from fastapi import FastAPI

from tests.factories import TestUser, make_order, order_payload
from tests.problems import assert_problem

# RFC 3986 path-abempty: what a URI reference's path may hold.
URI_PATH = re.compile(r"^(?:/(?:[A-Za-z0-9\-._~!$&'()*+,;=:@]|%[0-9A-Fa-f]{2})*)*$")


def _concrete(path: str, order_id: str) -> str:
    return (
        path.replace("{order_id}", order_id)
        .replace("{service}", "nowhere")
        .replace("{path:path}", "x/y")
        .replace("{name}", "favicon.png")
    )


async def test_every_get_route_answers_head_with_the_get_status_and_headers_and_no_body(
    app_factory: Callable[..., FastAPI], client: httpx.AsyncClient, user: TestUser
) -> None:
    order = await make_order(client, user)
    paths = sorted(
        {
            route.path
            # One flat table (`create_app`), inspected, not started.
            for route in app_factory().routes
            if "GET" in (getattr(route, "methods", None) or ())
        }
    )
    assert {"/ping", "/v1/orders", "/v1/orders/{order_id}", "/docs", "/openapi.json"} <= set(paths)
    for template in paths:
        path = _concrete(template, order["id"])
        got = await client.get(path, headers=user.headers)
        head = await client.head(path, headers=user.headers)
        assert head.status_code == got.status_code, path
        assert head.status_code != 405, path
        assert head.content == b"", path
        assert head.headers["content-type"] == got.headers["content-type"], path
        # The same representation's length (/metrics and /ping/ready change between calls).
        if template in ("/docs", "/redoc", "/openapi.json", "/asyncapi.json", "/ping"):
            assert head.headers["content-length"] == got.headers["content-length"], path


async def test_head_keeps_conditional_reads_and_is_counted_as_head(
    client: httpx.AsyncClient, user: TestUser
) -> None:
    order = await make_order(client, user)
    url = f"/v1/orders/{order['id']}"
    etag = (await client.get(url, headers=user.headers)).headers["etag"]
    head = await client.head(url, headers={**user.headers, "If-None-Match": etag})
    assert head.status_code == 304
    assert head.headers["etag"] == etag
    metrics = (await client.get("/metrics")).text
    assert 'http_requests_total{method="HEAD",route="/v1/orders/{order_id}",status="304"}' in (
        metrics
    )


async def test_a_post_only_route_refuses_head_with_405_naming_its_methods(
    client: httpx.AsyncClient,
) -> None:
    response = await client.head("/v1/auth/login")
    assert response.status_code == 405
    assert response.headers["allow"] == "POST"


JSON_BODY_ROUTES = [
    ("POST", "/v1/orders"),
    ("POST", "/v1/auth/register"),
    ("POST", "/v1/auth/login"),
    ("POST", "/v1/auth/refresh"),
    ("POST", "/v1/auth/logout"),
    ("PATCH", "/v1/orders/{order_id}"),
]


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("text/plain", b'{"currency": "EUR"}'),
        ("application/x-www-form-urlencoded", b"currency=EUR"),
        ("multipart/form-data; boundary=x", b"--x--"),
        (None, b'{"currency": "EUR"}'),
        ("application/xml", b"<order/>"),
    ],
)
async def test_a_body_that_is_not_json_is_415_on_every_json_route(
    client: httpx.AsyncClient, admin: TestUser, content_type: str | None, body: bytes
) -> None:
    headers = dict(admin.headers)
    if content_type is not None:
        headers["Content-Type"] = content_type
    for method, template in JSON_BODY_ROUTES:
        path = template.replace("{order_id}", str(uuid.uuid4()))
        response = await client.request(method, path, content=body, headers=headers)
        assert response.status_code == 415, (method, path, response.text)
        problem = assert_problem(response, 415, "unsupported-media-type")
        assert response.headers["accept"] == "application/json"
        assert problem["title"] == "Unsupported Media Type"
        assert "application/json" in problem["detail"]


async def test_json_with_a_charset_or_a_plus_json_type_is_accepted(
    client: httpx.AsyncClient, user: TestUser
) -> None:
    for content_type in ("application/json; charset=utf-8", "application/vnd.orders+json"):
        response = await client.post(
            "/v1/orders",
            content=json.dumps(order_payload()).encode(),
            headers={**user.headers, "Content-Type": content_type},
        )
        assert response.status_code == 201, (content_type, response.text)


async def test_the_oauth2_form_route_still_takes_its_form(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/v1/auth/token", data={"username": "nobody@example.com", "password": "wrong password"}
    )
    assert response.status_code == 401  # read and judged, not refused as a media type


async def test_no_body_at_all_is_still_a_422_naming_the_missing_body(
    client: httpx.AsyncClient, user: TestUser
) -> None:
    response = await client.post("/v1/orders", headers=user.headers)
    assert response.status_code == 422
    assert response.json()["errors"] == [
        {"loc": ["body"], "msg": "Field required", "type": "missing"}
    ]


@pytest.mark.parametrize(
    "body",
    [
        b'{"currency": "EUR"',  # truncated
        b'{"currency": "EUR"} trailing',
        b"\xff\xfe{}",  # not UTF-8
        b"[" * 100_000,  # nested past any parser's limit
        b"{'currency': 'EUR'}",  # single quotes
    ],
)
async def test_malformed_json_is_one_422_shape_on_every_json_route(
    client: httpx.AsyncClient, admin: TestUser, body: bytes
) -> None:
    headers = {**admin.headers, "Content-Type": "application/json"}
    for method, template in JSON_BODY_ROUTES:
        path = template.replace("{order_id}", str(uuid.uuid4()))
        response = await client.request(method, path, content=body, headers=headers)
        assert response.status_code == 422, (method, path, body[:20], response.text)
        problem = assert_problem(response, 422, "validation-error")
        assert problem["detail"] == "The request body is not valid JSON."
        [error] = problem["errors"]
        assert error["loc"] == ["body"]
        assert error["type"] == "json_invalid"
        assert error["msg"].startswith("Invalid JSON")


@pytest.mark.parametrize(
    ("sent", "expected_status"),
    [
        ("/v1/orders/not%20an%20id", 422),
        ("/v1/no%20such/%E2%82%AC", 404),
        ("/v1/orders/%22quoted%22", 422),
        ("/v1/orders/a%25b", 422),
    ],
)
async def test_problem_instance_is_the_path_as_sent_percent_encoded(
    client: httpx.AsyncClient, user: TestUser, sent: str, expected_status: int
) -> None:
    response = await client.get(sent + "?limit=1", headers=user.headers)
    assert response.status_code == expected_status
    instance = response.json()["instance"]
    assert instance == sent
    assert URI_PATH.match(instance), instance


async def test_the_413_from_the_outer_layer_has_an_encoded_instance_too(
    client: httpx.AsyncClient,
) -> None:
    response = await client.post(
        "/v1/big%20body",
        content=b"x" * (1024 * 1024 + 1),
        headers={"Content-Type": "application/json"},
    )
    assert response.status_code == 413
    assert response.json()["instance"] == "/v1/big%20body"
