"""What the app relies on in FastAPI beyond its documented API; each failure says what to do.

`create_app` puts the routers' routes into the app's own route table instead of calling
`include_router` (a request through an included router costs ~8 us more server CPU:
see the comment in `api/main.py`). That is the same app only while an `APIRouter`
writes its prefix, tags, dependencies, responses and route class into each route as it
is declared, as FastAPI 0.165 does.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, FastAPI
from fastapi.openapi.utils import get_openapi

from api.main import ROUTERS
from api.media_types import JSONBodyRoute

SWITCH = (
    "FastAPI changed how an APIRouter's settings reach its routes, so the routes that "
    "create_app (api/main.py) adds to the app's table directly no longer match what "
    "include_router would serve. Switch create_app to `app.include_router(router)` for "
    "each router (and api/worker.py likewise), then drop this test."
)


async def _probe_dependency() -> None:
    return None


def test_a_router_writes_its_settings_into_each_route_it_declares() -> None:
    router = APIRouter(
        prefix="/probe",
        tags=["probe"],
        dependencies=[Depends(_probe_dependency)],
        responses={418: {"description": "teapot"}},
        route_class=JSONBodyRoute,
    )

    @router.get("/item")
    async def item() -> None:
        return None

    (route,) = router.routes
    assert isinstance(route, JSONBodyRoute), SWITCH
    assert route.path == "/probe/item", SWITCH
    assert route.tags == ["probe"], SWITCH
    assert [depends.dependency for depends in route.dependencies] == [_probe_dependency], SWITCH
    assert 418 in route.responses, SWITCH
    flat = [dependant.call for dependant in route.dependant.dependencies]
    assert _probe_dependency in flat, SWITCH


def _document(app: FastAPI) -> dict[str, Any]:
    return get_openapi(title="t", version="1", routes=app.routes)


def test_the_routers_served_directly_document_what_include_router_would() -> None:
    """Paths, operations, parameters, security and responses: the same either way."""
    direct, included = FastAPI(), FastAPI()
    for router in ROUTERS:
        direct.router.routes.extend(router.routes)
        included.include_router(router)
    assert _document(direct) == _document(included), SWITCH
