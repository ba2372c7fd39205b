"""Orders: lifecycle, state machine, ownership, keyset pagination, ETags and validation."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from api.helpers.enums import ORDER_TRANSITIONS, OrderStatus
from tests.factories import TestUser, insert_orders, make_order, order_events, order_payload
from tests.problems import assert_problem

Sessionmaker = async_sessionmaker[AsyncSession]


def error_locs(response: httpx.Response) -> list[list[Any]]:
    body = assert_problem(response, 422, "validation-error")
    return [error["loc"] for error in body["errors"]]


async def order_status_row(sessionmaker: Sessionmaker, order_id: str) -> tuple[str, int]:
    async with sessionmaker() as session:
        row = (
            await session.execute(
                text("SELECT status, version FROM orders WHERE id = :id"), {"id": order_id}
            )
        ).one()
        return row.status, row.version


async def order_count(sessionmaker: Sessionmaker, user_id: uuid.UUID) -> int:
    async with sessionmaker() as session:
        count: int = (
            await session.execute(
                text("SELECT count(*) FROM orders WHERE user_id = :id"), {"id": user_id}
            )
        ).scalar_one()
        return count


async def patch_status(
    client: httpx.AsyncClient, admin: TestUser, order_id: str, status: str, **headers: str
) -> httpx.Response:
    return await client.patch(
        f"/v1/orders/{order_id}", json={"status": status}, headers={**admin.headers, **headers}
    )


# --- create -------------------------------------------------------------------------


async def test_create_returns_201_with_location_etag_and_server_totals(
    client: httpx.AsyncClient, user: TestUser, sessionmaker: Sessionmaker
) -> None:
    response = await client.post("/v1/orders", json=order_payload(), headers=user.headers)

    assert response.status_code == 201, response.text
    order = response.json()
    assert response.headers["location"] == f"/v1/orders/{order['id']}"
    assert response.headers["etag"] == f'"1-{uuid.UUID(order["id"]).hex}"'
    assert "idempotent-replayed" not in response.headers
    assert order["user_id"] == str(user.id)
    assert order["status"] == "pending"
    assert order["version"] == 1
    assert order["currency"] == "EUR"
    assert order["items"] == [
        {"sku": "SKU-1", "name": "Widget", "quantity": 2, "line_total": 2500, "unit_price": 1250},
        {"sku": "SKU-2", "name": None, "quantity": 1, "line_total": 499, "unit_price": 499},
    ]
    assert order["total_amount"] == 2999
    assert order["metadata"] == {"channel": "web"}
    assert order["created_at"].endswith("Z")
    assert order["updated_at"].endswith("Z")

    events = await order_events(sessionmaker, order["id"])
    assert [key for key, _ in events] == ["order.created"]
    envelope = events[0][1]
    assert envelope["type"] == "order.created"
    assert envelope["subject"] == order["id"]
    assert envelope["source"] == f"/v1/orders/{order['id']}"
    assert envelope["sequence"] == "00000000000000000001"
    assert envelope["data"]["total_amount"] == 2999


async def test_create_without_metadata_stores_an_empty_object(
    client: httpx.AsyncClient, user: TestUser
) -> None:
    payload = order_payload()
    del payload["metadata"]
    response = await client.post("/v1/orders", json=payload, headers=user.headers)
    assert response.status_code == 201, response.text
    assert response.json()["metadata"] == {}


async def test_create_needs_a_token(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/orders", json=order_payload())
    assert_problem(response, 401, "unauthorized")
    assert response.headers["www-authenticate"] == "Bearer"


async def test_client_supplied_totals_are_refused_as_unknown_fields(
    client: httpx.AsyncClient, user: TestUser
) -> None:
    payload = order_payload(total_amount=1)
    payload["items"] = [{"sku": "A", "quantity": 1, "unit_price": 5, "line_total": 1}]
    response = await client.post("/v1/orders", json=payload, headers=user.headers)
    locs = error_locs(response)
    assert ["body", "total_amount"] in locs
    assert ["body", "items", 0, "line_total"] in locs


async def test_malformed_json_is_a_validation_error(
    client: httpx.AsyncClient, user: TestUser
) -> None:
    response = await client.post(
        "/v1/orders",
        content=b'{"currency": "EUR", "items": [',
        headers={**user.headers, "Content-Type": "application/json"},
    )
    assert_problem(response, 422, "validation-error")


# --- validation limits ----------------------------------------------------------------


def _item(**overrides: object) -> dict[str, object]:
    item: dict[str, object] = {"sku": "SKU-1", "quantity": 1, "unit_price": 100}
    item.update(overrides)
    return item


ACCEPTED_BODIES = {
    "one item": order_payload(items=[_item()]),
    "100 items": order_payload(items=[_item(sku=f"S{i}") for i in range(100)]),
    "quantity 1": order_payload(items=[_item(quantity=1)]),
    "quantity 10000": order_payload(items=[_item(quantity=10_000)]),
    "unit_price 0": order_payload(items=[_item(unit_price=0)]),
    "unit_price 100000000": order_payload(items=[_item(unit_price=100_000_000)]),
    "sku 1 char": order_payload(items=[_item(sku="A")]),
    "sku 64 chars": order_payload(items=[_item(sku="a._-Z9" + "x" * 58)]),
    "metadata 20 keys": order_payload(metadata={f"k{i}": "v" for i in range(20)}),
    "metadata key 40 chars": order_payload(metadata={"k" * 40: "v"}),
    "metadata value 500 chars": order_payload(metadata={"k": "v" * 500}),
    "metadata value empty": order_payload(metadata={"k": ""}),
}


@pytest.mark.parametrize("body", ACCEPTED_BODIES.values(), ids=ACCEPTED_BODIES.keys())
async def test_boundary_values_inside_the_limits_are_accepted(
    client: httpx.AsyncClient, user: TestUser, body: dict[str, object]
) -> None:
    response = await client.post("/v1/orders", json=body, headers=user.headers)
    assert response.status_code == 201, response.text
    order = response.json()
    assert len(order["items"]) == len(body["items"])  # type: ignore[arg-type]
    assert order["total_amount"] == sum(item["line_total"] for item in order["items"])


def _metadata_key_loc(key: str) -> list[Any]:
    return ["body", "metadata", key, "[key]"]


REFUSED_BODIES: dict[str, tuple[dict[str, object], list[Any]]] = {
    "no items": (order_payload(items=[]), ["body", "items"]),
    "101 items": (order_payload(items=[_item(sku=f"S{i}") for i in range(101)]), ["body", "items"]),
    "items missing": ({"currency": "EUR"}, ["body", "items"]),
    "quantity 0": (order_payload(items=[_item(quantity=0)]), ["body", "items", 0, "quantity"]),
    "quantity 10001": (
        order_payload(items=[_item(quantity=10_001)]),
        ["body", "items", 0, "quantity"],
    ),
    "quantity as bool": (
        order_payload(items=[_item(quantity=True)]),
        ["body", "items", 0, "quantity"],
    ),
    "quantity as float": (
        order_payload(items=[_item(quantity=1.0)]),
        ["body", "items", 0, "quantity"],
    ),
    "quantity as string": (
        order_payload(items=[_item(quantity="1")]),
        ["body", "items", 0, "quantity"],
    ),
    "unit_price -1": (
        order_payload(items=[_item(unit_price=-1)]),
        ["body", "items", 0, "unit_price"],
    ),
    "unit_price 100000001": (
        order_payload(items=[_item(unit_price=100_000_001)]),
        ["body", "items", 0, "unit_price"],
    ),
    "unit_price as bool": (
        order_payload(items=[_item(unit_price=False)]),
        ["body", "items", 0, "unit_price"],
    ),
    "sku empty": (order_payload(items=[_item(sku="")]), ["body", "items", 0, "sku"]),
    "sku 65 chars": (order_payload(items=[_item(sku="x" * 65)]), ["body", "items", 0, "sku"]),
    "sku with a space": (order_payload(items=[_item(sku="SKU 1")]), ["body", "items", 0, "sku"]),
    "sku with a slash": (order_payload(items=[_item(sku="SKU/1")]), ["body", "items", 0, "sku"]),
    "sku non-ascii": (order_payload(items=[_item(sku="SKÜ")]), ["body", "items", 0, "sku"]),
    "sku trailing newline": (
        order_payload(items=[_item(sku="SKU\n")]),
        ["body", "items", 0, "sku"],
    ),
    "item unknown field": (
        order_payload(items=[_item(colour="red")]),
        ["body", "items", 0, "colour"],
    ),
    "currency lower case": (order_payload(currency="eur"), ["body", "currency"]),
    "currency four letters": (order_payload(currency="EURO"), ["body", "currency"]),
    "currency two letters": (order_payload(currency="EU"), ["body", "currency"]),
    "currency trailing newline": (order_payload(currency="EUR\n"), ["body", "currency"]),
    "metadata 21 keys": (
        order_payload(metadata={f"k{i}": "v" for i in range(21)}),
        ["body", "metadata"],
    ),
    "metadata key 41 chars": (
        order_payload(metadata={"k" * 41: "v"}),
        _metadata_key_loc("k" * 41),
    ),
    "metadata value 501 chars": (
        order_payload(metadata={"k": "v" * 501}),
        ["body", "metadata", "k"],
    ),
    "metadata value a number": (order_payload(metadata={"k": 1}), ["body", "metadata", "k"]),
    "metadata a list": (order_payload(metadata=["k"]), ["body", "metadata"]),
    "unknown top-level field": (order_payload(status="paid"), ["body", "status"]),
}


@pytest.mark.parametrize(("body", "loc"), REFUSED_BODIES.values(), ids=REFUSED_BODIES.keys())
async def test_boundary_values_outside_the_limits_are_422_naming_the_field(
    client: httpx.AsyncClient,
    user: TestUser,
    sessionmaker: Sessionmaker,
    body: dict[str, object],
    loc: list[Any],
) -> None:
    response = await client.post("/v1/orders", json=body, headers=user.headers)
    assert loc in error_locs(response)
    assert await order_count(sessionmaker, user.id) == 0


async def test_several_bad_fields_are_all_listed(client: httpx.AsyncClient, user: TestUser) -> None:
    body = order_payload(currency="eur", items=[_item(quantity=0, unit_price=-1)])
    locs = error_locs(await client.post("/v1/orders", json=body, headers=user.headers))
    assert ["body", "currency"] in locs
    assert ["body", "items", 0, "quantity"] in locs
    assert ["body", "items", 0, "unit_price"] in locs


# --- read -----------------------------------------------------------------------------


async def test_owner_and_admin_read_the_order_with_its_etag(
    client: httpx.AsyncClient, user: TestUser, admin: TestUser
) -> None:
    order = await make_order(client, user)
    for viewer in (user, admin):
        response = await client.get(f"/v1/orders/{order['id']}", headers=viewer.headers)
        assert response.status_code == 200, response.text
        assert response.json() == order
        assert response.headers["etag"] == f'"1-{uuid.UUID(order["id"]).hex}"'


async def test_missing_order_is_404_and_malformed_id_422(
    client: httpx.AsyncClient, user: TestUser
) -> None:
    assert_problem(
        await client.get(f"/v1/orders/{uuid.uuid4()}", headers=user.headers), 404, "not-found"
    )
    assert ["path", "order_id"] in error_locs(
        await client.get("/v1/orders/not-a-uuid", headers=user.headers)
    )


async def test_if_none_match_with_the_current_etag_is_304(
    client: httpx.AsyncClient, user: TestUser
) -> None:
    order = await make_order(client, user)
    url = f"/v1/orders/{order['id']}"
    etag = (await client.get(url, headers=user.headers)).headers["etag"]

    for condition in (etag, f"W/{etag}", f'"other", {etag}', "*"):
        response = await client.get(url, headers={**user.headers, "If-None-Match": condition})
        assert response.status_code == 304, condition
        assert response.headers["etag"] == etag
        assert response.content == b""

    stale = await client.get(url, headers={**user.headers, "If-None-Match": '"0-abc"'})
    assert stale.status_code == 200
    assert stale.json() == order


async def test_etag_changes_with_every_version_and_matches_the_body(
    client: httpx.AsyncClient, user: TestUser, admin: TestUser
) -> None:
    order = await make_order(client, user)
    url = f"/v1/orders/{order['id']}"
    first = (await client.get(url, headers=user.headers)).headers["etag"]

    patched = await patch_status(client, admin, order["id"], "paid")
    assert patched.status_code == 200, patched.text
    assert patched.headers["etag"] != first

    # A strong ETag promises identical bytes: the write's response and a later read agree.
    read = await client.get(url, headers=user.headers)
    assert read.headers["etag"] == patched.headers["etag"]
    assert read.content == patched.content
    old = await client.get(url, headers={**user.headers, "If-None-Match": first})
    assert old.status_code == 200


# --- ownership (BOLA) -----------------------------------------------------------------


async def test_someone_elses_order_is_404_on_get_and_cancel(
    client: httpx.AsyncClient, user: TestUser, other_user: TestUser, sessionmaker: Sessionmaker
) -> None:
    order = await make_order(client, user)
    missing = assert_problem(
        await client.get(f"/v1/orders/{uuid.uuid4()}", headers=other_user.headers),
        404,
        "not-found",
    )

    got = await client.get(f"/v1/orders/{order['id']}", headers=other_user.headers)
    cancelled = await client.post(f"/v1/orders/{order['id']}/cancel", headers=other_user.headers)

    for response in (got, cancelled):
        body = assert_problem(response, 404, "not-found")
        assert body["detail"] == missing["detail"]  # indistinguishable from a missing order
    assert await order_status_row(sessionmaker, order["id"]) == ("pending", 1)
    assert [key for key, _ in await order_events(sessionmaker, order["id"])] == ["order.created"]


@pytest.mark.parametrize("whose", ["own", "someone else's", "missing", "malformed"])
async def test_non_admin_patch_is_403_for_any_id(
    client: httpx.AsyncClient,
    user: TestUser,
    other_user: TestUser,
    sessionmaker: Sessionmaker,
    whose: str,
) -> None:
    own = await make_order(client, user)
    others = await make_order(client, other_user)
    order_id = {
        "own": own["id"],
        "someone else's": others["id"],
        "missing": str(uuid.uuid4()),
        "malformed": "not-a-uuid",
    }[whose]

    response = await patch_status(client, user, order_id, "paid")

    assert_problem(response, 403, "forbidden")
    assert await order_status_row(sessionmaker, own["id"]) == ("pending", 1)
    assert await order_status_row(sessionmaker, others["id"]) == ("pending", 1)


async def test_admin_patch_of_a_missing_order_is_404(
    client: httpx.AsyncClient, admin: TestUser
) -> None:
    response = await patch_status(client, admin, str(uuid.uuid4()), "paid")
    assert_problem(response, 404, "not-found")


# --- lifecycle and the state machine --------------------------------------------------


async def test_lifecycle_end_to_end(
    client: httpx.AsyncClient, user: TestUser, admin: TestUser, sessionmaker: Sessionmaker
) -> None:
    order = await make_order(client, user)
    order_id = order["id"]
    previous = "pending"

    for version, status in enumerate(("paid", "shipped", "delivered"), start=2):
        response = await patch_status(client, admin, order_id, status)
        assert response.status_code == 200, response.text
        body = response.json()
        assert (body["status"], body["version"]) == (status, version)
        assert body["updated_at"] >= order["updated_at"]
        assert response.headers["etag"] == f'"{version}-{uuid.UUID(order_id).hex}"'
        seen = (await client.get(f"/v1/orders/{order_id}", headers=user.headers)).json()
        assert (seen["status"], seen["version"]) == (status, version)
        previous = status

    assert_problem(
        await client.post(f"/v1/orders/{order_id}/cancel", headers=user.headers),
        409,
        "invalid-transition",
    )
    events = await order_events(sessionmaker, order_id)
    assert [key for key, _ in events] == [
        "order.created",
        "order.paid",
        "order.shipped",
        "order.delivered",
    ]
    # Zero-padded: plain string order is version order (CloudEvents sequence, SPEC §8).
    assert [envelope["sequence"] for _, envelope in events] == [
        f"{version:020d}" for version in (1, 2, 3, 4)
    ]
    assert [envelope["data"].get("previous_status") for _, envelope in events] == [
        None,
        "pending",
        "paid",
        "shipped",
    ]
    assert previous == "delivered"


@pytest.mark.parametrize("start", ["pending", "paid"])
@pytest.mark.parametrize("who", ["owner", "admin"])
async def test_cancel_from_pending_or_paid(
    client: httpx.AsyncClient,
    user: TestUser,
    admin: TestUser,
    sessionmaker: Sessionmaker,
    start: str,
    who: str,
) -> None:
    [order_id] = await insert_orders(sessionmaker, user.id, 1, status=start)
    caller = user if who == "owner" else admin

    response = await client.post(f"/v1/orders/{order_id}/cancel", headers=caller.headers)

    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["status"], body["version"]) == ("cancelled", 2)
    assert response.headers["etag"] == f'"2-{order_id.hex}"'
    events = await order_events(sessionmaker, order_id)
    assert [key for key, _ in events] == ["order.cancelled"]
    assert events[0][1]["data"]["previous_status"] == start


async def test_cancel_twice_is_invalid_transition(
    client: httpx.AsyncClient, user: TestUser, sessionmaker: Sessionmaker
) -> None:
    order = await make_order(client, user)
    url = f"/v1/orders/{order['id']}/cancel"
    assert (await client.post(url, headers=user.headers)).status_code == 200
    assert_problem(await client.post(url, headers=user.headers), 409, "invalid-transition")
    assert await order_status_row(sessionmaker, order["id"]) == ("cancelled", 2)


ALL_MOVES = [(src, dst) for src in OrderStatus for dst in OrderStatus]
INVALID_MOVES = [(src, dst) for src, dst in ALL_MOVES if dst not in ORDER_TRANSITIONS[src]]
VALID_MOVES = [(src, dst) for src, dst in ALL_MOVES if dst in ORDER_TRANSITIONS[src]]


@pytest.mark.parametrize(("start", "target"), INVALID_MOVES, ids=lambda s: str(s))
async def test_every_move_the_machine_forbids_is_409(
    client: httpx.AsyncClient,
    user: TestUser,
    admin: TestUser,
    sessionmaker: Sessionmaker,
    start: OrderStatus,
    target: OrderStatus,
) -> None:
    [order_id] = await insert_orders(sessionmaker, user.id, 1, status=start.value)

    response = await patch_status(client, admin, str(order_id), target.value)

    assert_problem(response, 409, "invalid-transition")
    assert await order_status_row(sessionmaker, str(order_id)) == (start.value, 1)
    assert await order_events(sessionmaker, order_id) == []
    if target is OrderStatus.CANCELLED:
        cancel = await client.post(f"/v1/orders/{order_id}/cancel", headers=user.headers)
        assert_problem(cancel, 409, "invalid-transition")


@pytest.mark.parametrize(("start", "target"), VALID_MOVES, ids=lambda s: str(s))
async def test_every_move_the_machine_allows_writes_one_event(
    client: httpx.AsyncClient,
    user: TestUser,
    admin: TestUser,
    sessionmaker: Sessionmaker,
    start: OrderStatus,
    target: OrderStatus,
) -> None:
    [order_id] = await insert_orders(sessionmaker, user.id, 1, status=start.value)

    response = await patch_status(client, admin, str(order_id), target.value)

    assert response.status_code == 200, response.text
    assert await order_status_row(sessionmaker, str(order_id)) == (target.value, 2)
    events = await order_events(sessionmaker, order_id)
    assert [key for key, _ in events] == [f"order.{target.value}"]
    assert events[0][1]["data"]["previous_status"] == start.value
    assert events[0][1]["sequence"] == "00000000000000000002"


async def test_patch_refuses_an_unknown_status_and_unknown_fields(
    client: httpx.AsyncClient, user: TestUser, admin: TestUser
) -> None:
    order = await make_order(client, user)
    assert ["body", "status"] in error_locs(
        await patch_status(client, admin, order["id"], "refunded")
    )
    response = await client.patch(
        f"/v1/orders/{order['id']}",
        json={"status": "paid", "version": 7},
        headers=admin.headers,
    )
    assert ["body", "version"] in error_locs(response)


# --- If-Match -------------------------------------------------------------------------


async def test_patch_with_a_stale_if_match_is_412(
    client: httpx.AsyncClient, user: TestUser, admin: TestUser, sessionmaker: Sessionmaker
) -> None:
    order = await make_order(client, user)
    etag_v1 = (await client.get(f"/v1/orders/{order['id']}", headers=admin.headers)).headers["etag"]
    paid = await patch_status(client, admin, order["id"], "paid", **{"If-Match": etag_v1})
    assert paid.status_code == 200, paid.text

    stale = await patch_status(client, admin, order["id"], "shipped", **{"If-Match": etag_v1})

    assert_problem(stale, 412, "precondition-failed")
    assert await order_status_row(sessionmaker, order["id"]) == ("paid", 2)
    fresh = await patch_status(
        client, admin, order["id"], "shipped", **{"If-Match": paid.headers["etag"]}
    )
    assert fresh.status_code == 200, fresh.text
    assert fresh.json()["version"] == 3


@pytest.mark.parametrize(
    "condition",
    ['"1-00000000000000000000000000000000"', "W/{etag}", "garbage", '"7-{hex}"'],
)
async def test_if_match_that_does_not_name_the_current_version_is_412(
    client: httpx.AsyncClient, user: TestUser, admin: TestUser, condition: str
) -> None:
    order = await make_order(client, user)
    etag = f'"1-{uuid.UUID(order["id"]).hex}"'
    header = condition.format(etag=etag, hex=uuid.UUID(order["id"]).hex)
    response = await patch_status(client, admin, order["id"], "paid", **{"If-Match": header})
    assert_problem(response, 412, "precondition-failed")


@pytest.mark.parametrize("condition", ["*", '"9-{hex}", {etag}', '{etag}, "2-{hex}"'])
async def test_if_match_naming_the_current_version_applies(
    client: httpx.AsyncClient, user: TestUser, admin: TestUser, condition: str
) -> None:
    order = await make_order(client, user)
    etag = f'"1-{uuid.UUID(order["id"]).hex}"'
    header = condition.format(etag=etag, hex=uuid.UUID(order["id"]).hex)
    response = await patch_status(client, admin, order["id"], "paid", **{"If-Match": header})
    assert response.status_code == 200, response.text


async def test_cancel_honours_if_match(
    client: httpx.AsyncClient, user: TestUser, admin: TestUser
) -> None:
    order = await make_order(client, user)
    etag_v1 = f'"1-{uuid.UUID(order["id"]).hex}"'
    assert (await patch_status(client, admin, order["id"], "paid")).status_code == 200
    url = f"/v1/orders/{order['id']}/cancel"

    stale = await client.post(url, headers={**user.headers, "If-Match": etag_v1})
    assert_problem(stale, 412, "precondition-failed")
    current = f'"2-{uuid.UUID(order["id"]).hex}"'
    done = await client.post(url, headers={**user.headers, "If-Match": current})
    assert done.status_code == 200, done.text


async def test_if_match_on_someone_elses_order_is_still_404(
    client: httpx.AsyncClient, user: TestUser, other_user: TestUser
) -> None:
    order = await make_order(client, user)
    response = await client.post(
        f"/v1/orders/{order['id']}/cancel",
        headers={**other_user.headers, "If-Match": '"1-0"'},
    )
    assert_problem(response, 404, "not-found")


# --- concurrency ----------------------------------------------------------------------


async def test_concurrent_cancel_and_ship_one_wins(
    client: httpx.AsyncClient, user: TestUser, admin: TestUser, sessionmaker: Sessionmaker
) -> None:
    # From `paid`, cancel and ship exclude each other: whichever commits first wins.
    order_ids = await insert_orders(sessionmaker, user.id, 10, status="paid")

    async def race(order_id: uuid.UUID) -> list[int]:
        responses = await asyncio.gather(
            client.post(f"/v1/orders/{order_id}/cancel", headers=user.headers),
            patch_status(client, admin, str(order_id), "shipped"),
        )
        return sorted(response.status_code for response in responses)

    outcomes = await asyncio.gather(*(race(order_id) for order_id in order_ids))

    for order_id, statuses in zip(order_ids, outcomes, strict=True):
        assert statuses == [200, 409]
        status, version = await order_status_row(sessionmaker, str(order_id))
        assert status in {"cancelled", "shipped"}
        assert version == 2
        events = await order_events(sessionmaker, order_id)
        assert [key for key, _ in events] == [f"order.{status}"]
        assert events[0][1]["sequence"] == "00000000000000000002"


async def test_concurrent_patches_with_one_if_match_apply_once(
    client: httpx.AsyncClient, user: TestUser, admin: TestUser, sessionmaker: Sessionmaker
) -> None:
    order = await make_order(client, user)
    etag = f'"1-{uuid.UUID(order["id"]).hex}"'

    responses = await asyncio.gather(
        *(
            patch_status(client, admin, order["id"], target, **{"If-Match": etag})
            for target in ["paid", "cancelled"] * 5
        )
    )

    statuses = sorted(response.status_code for response in responses)
    assert statuses == [200] + [412] * 9
    status, version = await order_status_row(sessionmaker, order["id"])
    assert (status, version) in {("paid", 2), ("cancelled", 2)}
    assert len(await order_events(sessionmaker, order["id"])) == 2  # created + the winner


# --- listing --------------------------------------------------------------------------


async def list_page(client: httpx.AsyncClient, viewer: TestUser, **params: Any) -> dict[str, Any]:
    response = await client.get("/v1/orders", params=params, headers=viewer.headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    page: dict[str, Any] = response.json()
    return page


def position(order: dict[str, Any]) -> tuple[str, str]:
    return order["created_at"], order["id"]


async def test_pagination_over_250_orders_has_no_duplicates_or_gaps_while_orders_arrive(
    client: httpx.AsyncClient, user: TestUser, sessionmaker: Sessionmaker
) -> None:
    # Batches share one created_at, so the id tie-breaker is exercised within each batch.
    expected: set[str] = set()
    for size in (60, 1, 89, 50, 50):
        expected.update(
            str(order_id) for order_id in await insert_orders(sessionmaker, user.id, size)
        )
    assert len(expected) == 250

    seen: list[dict[str, Any]] = []
    arrived: set[str] = set()
    cursor: str | None = None
    for _ in range(100):  # bounded: 250 / 7 pages plus the arrivals' first page
        params: dict[str, Any] = {"limit": 7}
        if cursor is not None:
            params["cursor"] = cursor
        page = await list_page(client, user, **params)
        seen.extend(page["items"])
        cursor = page["next_cursor"]
        if cursor is None:
            break
        # New orders between pages are newer than the cursor, so they never reappear below it.
        arrived.add((await make_order(client, user))["id"])
        arrived.update(str(i) for i in await insert_orders(sessionmaker, user.id, 2))
    else:
        pytest.fail("pagination did not end")

    ids = [order["id"] for order in seen]
    assert len(ids) == len(set(ids)), "duplicates across pages"
    assert set(ids) == expected, "gaps or strangers across pages"
    assert not arrived & set(ids)
    # Newest first, strictly, on (created_at, id) as PostgreSQL orders them.
    async with sessionmaker() as session:
        db_order = (
            (
                await session.execute(
                    text(
                        "SELECT id::text FROM orders WHERE id = ANY(CAST(:ids AS uuid[]))"
                        " ORDER BY created_at DESC, id DESC"
                    ),
                    {"ids": ids},
                )
            )
            .scalars()
            .all()
        )
    assert ids == list(db_order)
    # The arrivals (more than a page of them) are what the first page shows now.
    newest = await list_page(client, user, limit=100)
    assert {order["id"] for order in newest["items"]} <= arrived
    assert len(newest["items"]) == min(100, len(arrived))


async def test_limit_defaults_to_20_and_is_bounded(
    client: httpx.AsyncClient, user: TestUser, sessionmaker: Sessionmaker
) -> None:
    await insert_orders(sessionmaker, user.id, 101)

    assert len((await list_page(client, user))["items"]) == 20
    assert len((await list_page(client, user, limit=1))["items"]) == 1
    full = await list_page(client, user, limit=100)
    assert len(full["items"]) == 100
    assert full["next_cursor"] is not None
    last = await list_page(client, user, limit=100, cursor=full["next_cursor"])
    assert len(last["items"]) == 1
    assert last["next_cursor"] is None

    for bad in ("0", "101", "-1", "ten", "1.5"):
        response = await client.get("/v1/orders", params={"limit": bad}, headers=user.headers)
        assert ["query", "limit"] in error_locs(response), bad


async def test_a_user_without_orders_gets_an_empty_page(
    client: httpx.AsyncClient, user: TestUser
) -> None:
    assert await list_page(client, user) == {"items": [], "next_cursor": None}


@pytest.mark.parametrize(
    "cursor",
    ["garbage", "", "A" * 38, "%%%", "AAZg3a0_zf4uPT7A0eRGxLXm_YNq0-pmkz_6dQ" + "A"],
)
async def test_a_garbled_cursor_is_a_validation_error(
    client: httpx.AsyncClient, user: TestUser, cursor: str
) -> None:
    response = await client.get("/v1/orders", params={"cursor": cursor}, headers=user.headers)
    assert ["query", "cursor"] in error_locs(response)


async def test_a_cursor_with_one_character_changed_is_refused(
    client: httpx.AsyncClient, user: TestUser, sessionmaker: Sessionmaker
) -> None:
    await insert_orders(sessionmaker, user.id, 3)
    cursor = (await list_page(client, user, limit=1))["next_cursor"]
    assert cursor is not None
    for index in (0, len(cursor) // 2, len(cursor) - 1):
        replacement = "B" if cursor[index] != "B" else "C"
        garbled = cursor[:index] + replacement + cursor[index + 1 :]
        response = await client.get("/v1/orders", params={"cursor": garbled}, headers=user.headers)
        assert ["query", "cursor"] in error_locs(response)


async def test_status_filter(
    client: httpx.AsyncClient, user: TestUser, sessionmaker: Sessionmaker
) -> None:
    pending = {str(i) for i in await insert_orders(sessionmaker, user.id, 3)}
    paid = {str(i) for i in await insert_orders(sessionmaker, user.id, 4, status="paid")}

    only_paid = await list_page(client, user, status="paid", limit=2)
    rest = await list_page(client, user, status="paid", cursor=only_paid["next_cursor"])
    assert {o["id"] for o in only_paid["items"] + rest["items"]} == paid
    assert {o["id"] for o in (await list_page(client, user, status="pending"))["items"]} == pending
    assert (await list_page(client, user, status="shipped"))["items"] == []
    response = await client.get("/v1/orders", params={"status": "lost"}, headers=user.headers)
    assert ["query", "status"] in error_locs(response)


async def test_a_user_lists_only_their_own_orders(
    client: httpx.AsyncClient, user: TestUser, other_user: TestUser, sessionmaker: Sessionmaker
) -> None:
    mine = {str(i) for i in await insert_orders(sessionmaker, user.id, 3)}
    await insert_orders(sessionmaker, other_user.id, 3)

    page = await list_page(client, user, limit=100)
    assert {order["id"] for order in page["items"]} == mine
    assert {order["user_id"] for order in page["items"]} == {str(user.id)}


async def test_a_non_admin_user_id_filter_never_reveals_others_orders(
    client: httpx.AsyncClient, user: TestUser, other_user: TestUser, sessionmaker: Sessionmaker
) -> None:
    mine = {str(i) for i in await insert_orders(sessionmaker, user.id, 2)}
    await insert_orders(sessionmaker, other_user.id, 2)

    own = await list_page(client, user, user_id=str(user.id))
    assert {order["id"] for order in own["items"]} == mine
    for target in (other_user.id, uuid.uuid4()):
        response = await client.get(
            "/v1/orders", params={"user_id": str(target)}, headers=user.headers
        )
        assert_problem(response, 403, "forbidden")


async def test_admin_lists_everyones_orders_and_filters_by_user(
    client: httpx.AsyncClient,
    user: TestUser,
    other_user: TestUser,
    admin: TestUser,
    sessionmaker: Sessionmaker,
) -> None:
    mine = {str(i) for i in await insert_orders(sessionmaker, user.id, 2)}
    theirs = {str(i) for i in await insert_orders(sessionmaker, other_user.id, 3, status="paid")}

    newest = await list_page(client, admin, limit=100)
    assert mine | theirs <= {order["id"] for order in newest["items"]}

    filtered = await list_page(client, admin, user_id=str(other_user.id))
    assert {order["id"] for order in filtered["items"]} == theirs
    both = await list_page(client, admin, user_id=str(other_user.id), status="pending")
    assert both["items"] == []
    paid = await list_page(client, admin, user_id=str(other_user.id), status="paid", limit=2)
    assert len(paid["items"]) == 2
    assert paid["next_cursor"] is not None
