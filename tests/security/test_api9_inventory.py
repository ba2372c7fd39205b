"""API9:2023 Improper Inventory Management: the published document is the whole API.

Every route the app serves is in /openapi.json, and nothing else is; the few routes
kept out of it are exactly the ops probes, the metrics and the docs themselves.
"""

from __future__ import annotations

from collections.abc import Callable

import httpx
from fastapi import FastAPI

from tests.problems import assert_problem

# Served but not documented on purpose: probe aliases, Prometheus, the docs.
HIDDEN_ROUTES = {
    ("GET", "/livez"),
    ("GET", "/readyz"),
    ("GET", "/metrics"),
    ("GET", "/docs"),
    ("GET", "/docs/oauth2-redirect"),
    ("GET", "/docs/assets/{name}"),
    ("GET", "/redoc"),
    ("GET", "/openapi.json"),
}


def served_routes(app: FastAPI) -> tuple[set[tuple[str, str]], set[tuple[str, str]]]:
    """(documented, hidden) (method, path) pairs of every route the app serves."""
    documented: set[tuple[str, str]] = set()
    hidden: set[tuple[str, str]] = set()
    # The app's routes are one flat table (`create_app`; tests/test_library_internals.py).
    for route in app.routes:
        methods = getattr(route, "methods", None)
        if not methods:
            continue
        path = route.path.replace("{path:path}", "{path}")
        for method in methods - {"HEAD"}:
            target = documented if getattr(route, "include_in_schema", False) else hidden
            target.add((method, path))
    return documented, hidden


async def test_api9_inventory_routes_equal_the_openapi_operations(
    app_factory: Callable[..., FastAPI],
) -> None:
    app = app_factory()  # inspected, not started
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        document = (await client.get("/openapi.json")).json()
    operations = {
        (method.upper(), path) for path, items in document["paths"].items() for method in items
    }
    documented, hidden = served_routes(app)
    assert documented == operations
    assert hidden == HIDDEN_ROUTES
    ids = [item["operationId"] for items in document["paths"].values() for item in items.values()]
    assert len(ids) == len(set(ids))


async def test_api9_inventory_hidden_routes_answer_and_nothing_else_is_served(
    client: httpx.AsyncClient,
) -> None:
    for method, path in sorted(HIDDEN_ROUTES):
        served = path.replace("{name}", "favicon.png")
        assert (await client.request(method, served)).status_code == 200, path
    for path in (
        "/docs/assets/.env",
        "/docs/assets/..%2Fconfigs.py",
        "/v2/orders",
        "/v0/orders",
        "/admin",
        "/debug",
        "/.env",
        "/api/v1/orders",
    ):
        response = await client.get(path)
        assert response.status_code == 404, path
        assert_problem(response, 404, "not-found")


async def test_api9_inventory_the_document_names_its_version_and_one_security_scheme(
    client: httpx.AsyncClient,
) -> None:
    document = (await client.get("/openapi.json")).json()
    assert document["info"]["title"] == "orders-api"
    assert document["info"]["version"]
    assert set(document["components"]["securitySchemes"]) == {"OAuth2PasswordBearer"}
    # Every error a client can receive is documented with its problem+json body.
    for items in document["paths"].values():
        for operation in items.values():
            for code, response in operation["responses"].items():
                if code.isdigit() and int(code) >= 400 and "health" not in str(response):
                    assert "application/problem+json" in response["content"], (code, operation)
