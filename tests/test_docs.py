"""The documentation a newcomer reads: offline Swagger UI and ReDoc, realistic examples.

SPEC §3: the docs work offline (every asset served by the service, never from a CDN),
Swagger's Authorize button works through /v1/auth/token, and request bodies and
problem responses carry realistic examples that validate against their schemas.
SPEC §4: the docs and documents are counted under their own path in the metrics.
"""

from __future__ import annotations

import re
from http import HTTPStatus
from typing import Any

import httpx
import jsonschema_rs
import pytest
from pydantic import BaseModel

from api.schemas import auth as auth_schemas
from api.schemas import orders as order_schemas
from tests.factories import PASSWORD, TestUser
from tests.problems import CONTRACT_SLUGS, PROBLEM, assert_problem

# Anything that names a host: an absolute URL, or a scheme-relative one.
OTHER_HOST = re.compile(r"(?:[a-z][a-z0-9+.-]*:)?//[^/\s'\"]", re.IGNORECASE)
REFERENCED = re.compile(r"""(?:src|href)\s*=\s*["']([^"']+)["']""", re.IGNORECASE)
ASSET_TYPES = {
    ".js": "text/javascript",
    ".css": "text/css",
    ".png": "image/png",
}
MODELS: dict[str, type[BaseModel]] = {
    "OrderCreate": order_schemas.OrderCreate,
    "OrderStatusUpdate": order_schemas.OrderStatusUpdate,
    "RegisterRequest": auth_schemas.RegisterRequest,
    "LoginRequest": auth_schemas.LoginRequest,
    "RefreshRequest": auth_schemas.RefreshRequest,
    "TokenForm": auth_schemas.TokenForm,
}


async def _document(client: httpx.AsyncClient) -> dict[str, Any]:
    response = await client.get("/openapi.json")
    assert response.status_code == 200
    document: dict[str, Any] = response.json()
    return document


def _operations(document: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (method, path, operation)
        for path, operations in document["paths"].items()
        for method, operation in operations.items()
    ]


def _validate(document: dict[str, Any], schema: dict[str, Any], value: Any) -> None:
    """Validate against a schema of the document, its `$ref`s resolved in the document."""
    jsonschema_rs.Draft202012Validator({**schema, "components": document["components"]}).validate(
        value
    )


@pytest.mark.parametrize("page", ["/docs", "/redoc", "/docs/oauth2-redirect"])
async def test_docs_pages_and_every_asset_they_load_are_served_here_naming_no_other_host(
    client: httpx.AsyncClient, page: str
) -> None:
    response = await client.get(page)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    html = response.text
    assert OTHER_HOST.findall(html) == []
    referenced = REFERENCED.findall(html)
    if page != "/docs/oauth2-redirect":  # that page is inline script only
        assert any(url.endswith(".js") for url in referenced), referenced
        assert any(url.endswith("favicon.png") for url in referenced), referenced
    for url in referenced:
        assert url.startswith("/"), url
        assert not url.startswith("//"), url
        asset = await client.get(url)
        assert asset.status_code == 200, url
        expected = ASSET_TYPES[url[url.rindex(".") :]]
        assert asset.headers["content-type"].startswith(expected), url
        assert len(asset.content) > 1000, url


async def test_swagger_ui_talks_to_no_validator_and_authorizes_through_the_token_route(
    client: httpx.AsyncClient, user: TestUser
) -> None:
    html = (await client.get("/docs")).text
    assert "'/openapi.json'" in html
    assert '"validatorUrl": null' in html  # no badge image from validator.swagger.io
    assert "/docs/oauth2-redirect" in html
    schemes = (await _document(client))["components"]["securitySchemes"]
    assert schemes["OAuth2PasswordBearer"]["flows"]["password"]["tokenUrl"] == "/v1/auth/token"
    # What the Authorize dialog posts: the password form, client fields empty.
    response = await client.post(
        "/v1/auth/token",
        data={"grant_type": "password", "username": user.email, "password": PASSWORD},
    )
    assert response.status_code == 200, response.text
    token = response.json()["access_token"]
    me = await client.get("/v1/auth/me", headers={"Authorization": f"Bearer {token}"})
    assert me.json()["email"] == user.email


async def test_an_asset_outside_the_list_is_a_problem_404(client: httpx.AsyncClient) -> None:
    for name in ("index.html", "..%2F..%2Fapi%2Fconfigs.py", "swagger-ui-bundle.js.map"):
        response = await client.get(f"/docs/assets/{name}")
        assert response.status_code == 404, name
        assert_problem(response, 404, "not-found")


async def test_the_docs_and_documents_are_counted_under_their_own_path(
    client: httpx.AsyncClient,
) -> None:
    paths = ["/docs", "/redoc", "/openapi.json", "/asyncapi.json", "/docs/assets/{name}"]
    for path in paths:
        assert (await client.get(path.replace("{name}", "favicon.png"))).status_code == 200
    assert (await client.get("/no-such-page")).status_code == 404
    # A CORS preflight is answered before routing; it still names its route.
    preflight = await client.options(
        "/openapi.json",
        headers={"Origin": "http://storefront.test", "Access-Control-Request-Method": "GET"},
    )
    assert preflight.status_code == 200
    metrics = (await client.get("/metrics")).text
    assert 'http_requests_total{method="OPTIONS",route="/openapi.json",status="200"}' in metrics
    for path in paths:
        assert f'http_requests_total{{method="GET",route="{path}",status="200"}}' in metrics, path
    assert 'route="unmatched",status="404"' in metrics
    # Only a path that matches no route is `unmatched`.
    assert not re.search(r'route="unmatched",status="200"', metrics)
    assert "/no-such-page" not in metrics


async def test_every_request_body_has_a_realistic_example_its_schema_and_model_accept(
    client: httpx.AsyncClient,
) -> None:
    document = await _document(client)
    seen: set[str] = set()
    for method, path, operation in _operations(document):
        for media_type, media in operation.get("requestBody", {}).get("content", {}).items():
            examples = media.get("examples", {})
            assert examples, (method, path, media_type)
            model_name = media["schema"]["$ref"].rsplit("/", 1)[-1]
            seen.add(model_name)
            for example in examples.values():
                _validate(document, media["schema"], example["value"])
                MODELS[model_name].model_validate(example["value"])
    assert seen == set(MODELS)
    # The answers carry examples too: an order, a page of orders, a user, a token pair.
    for path, method, code in (
        ("/v1/orders", "post", "201"),
        ("/v1/orders", "get", "200"),
        ("/v1/orders/{order_id}", "get", "200"),
        ("/v1/auth/me", "get", "200"),
        ("/v1/auth/login", "post", "200"),
    ):
        media = document["paths"][path][method]["responses"][code]["content"]["application/json"]
        assert media["examples"], (path, method, code)
        for example in media["examples"].values():
            _validate(document, media["schema"], example["value"])
    order = document["components"]["schemas"]["OrderCreate"]["examples"][0]
    # A storefront order, not regex noise: readable SKUs and prices in cents.
    assert all(re.fullmatch(r"[A-Z0-9-]+", item["sku"]) for item in order["items"])
    assert all(100 <= item["unit_price"] <= 100_000 for item in order["items"])


async def test_every_problem_response_has_examples_with_its_real_status_and_type(
    client: httpx.AsyncClient,
) -> None:
    document = await _document(client)
    problem_schema = {"$ref": "#/components/schemas/Problem"}
    checked = 0
    for method, path, operation in _operations(document):
        for code, response in operation["responses"].items():
            media = response.get("content", {}).get(PROBLEM)
            if media is None:
                continue
            examples = media.get("examples", {})
            assert examples, (method, path, code)
            for name, example in examples.items():
                value = example["value"]
                _validate(document, problem_schema, value)
                slug = value["type"].removeprefix("urn:orders-api:problem:")
                assert slug in CONTRACT_SLUGS, (method, path, code, name)
                assert value["status"] == int(code), (method, path, code, name)
                assert value["title"] == HTTPStatus(int(code)).phrase
                assert "{" not in value["instance"], value["instance"]
                checked += 1
    assert checked > 50

    def slugs(path: str, method: str, code: str) -> set[str]:
        examples = document["paths"][path][method]["responses"][code]["content"][PROBLEM]
        return {e["value"]["type"].rsplit(":", 1)[-1] for e in examples["examples"].values()}

    assert slugs("/v1/orders", "post", "409") == {"idempotency-key-in-use"}
    assert slugs("/v1/orders", "post", "422") == {"validation-error", "idempotency-key-reused"}
    assert slugs("/v1/orders", "post", "415") == {"unsupported-media-type"}
    assert slugs("/v1/orders/{order_id}", "patch", "409") == {"invalid-transition"}
    assert slugs("/v1/orders/{order_id}", "patch", "412") == {"precondition-failed"}
    assert slugs("/v1/auth/register", "post", "409") == {"conflict"}
    assert slugs("/v1/auth/login", "post", "401") == {"unauthorized"}
    assert slugs("/v1/auth/login", "post", "413") == {"payload-too-large"}
