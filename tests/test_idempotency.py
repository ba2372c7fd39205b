"""Idempotency-Key on POST /v1/orders: replay, reuse, in-flight, concurrency and expiry."""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import timedelta

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from api.database.query.idempotency import lock_name
from api.services.retention_sweeper import RetentionSweeper
from tests.factories import TestUser, order_events, order_payload
from tests.problems import assert_problem

Sessionmaker = async_sessionmaker[AsyncSession]


def new_key() -> str:
    return f"key-{uuid.uuid4()}"


async def post_order(
    client: httpx.AsyncClient, user: TestUser, key: str | bytes, **overrides: object
) -> httpx.Response:
    return await client.post(
        "/v1/orders",
        json=order_payload(**overrides),
        headers={**user.headers, "Idempotency-Key": key},  # type: ignore[dict-item]
    )


async def order_ids(sessionmaker: Sessionmaker, user_id: uuid.UUID) -> list[str]:
    async with sessionmaker() as session:
        rows = await session.execute(
            text("SELECT id::text FROM orders WHERE user_id = :id"), {"id": user_id}
        )
        return list(rows.scalars())


async def key_rows(sessionmaker: Sessionmaker, user_id: uuid.UUID) -> list[str]:
    async with sessionmaker() as session:
        rows = await session.execute(
            text("SELECT key FROM idempotency_keys WHERE user_id = :id"), {"id": user_id}
        )
        return list(rows.scalars())


async def test_replay_returns_the_first_response_and_creates_nothing(
    client: httpx.AsyncClient, user: TestUser, sessionmaker: Sessionmaker
) -> None:
    key = new_key()
    first = await post_order(client, user, key)
    assert first.status_code == 201, first.text
    assert "idempotent-replayed" not in first.headers

    again = await post_order(client, user, key)

    assert again.status_code == 201
    assert again.headers["idempotent-replayed"] == "true"
    assert again.content == first.content
    assert again.headers["location"] == first.headers["location"]
    assert again.headers["etag"] == first.headers["etag"]
    order_id = first.json()["id"]
    assert await order_ids(sessionmaker, user.id) == [order_id]
    assert [key for key, _ in await order_events(sessionmaker, order_id)] == ["order.created"]


async def test_replay_is_the_first_response_even_after_the_order_changed(
    client: httpx.AsyncClient, user: TestUser
) -> None:
    key = new_key()
    first = await post_order(client, user, key)
    order_id = first.json()["id"]
    assert (await client.post(f"/v1/orders/{order_id}/cancel", headers=user.headers)).is_success

    again = await post_order(client, user, key)

    assert again.headers["idempotent-replayed"] == "true"
    assert again.json() == first.json()
    assert again.json()["status"] == "pending"


async def test_equivalent_bodies_replay(client: httpx.AsyncClient, user: TestUser) -> None:
    # The hash is over the validated body: key order and spelled-out defaults do not matter.
    key = new_key()
    items = [{"sku": "A-1", "quantity": 1, "unit_price": 10}]
    first = await client.post(
        "/v1/orders",
        json={"currency": "EUR", "items": items},
        headers={**user.headers, "Idempotency-Key": key},
    )
    assert first.status_code == 201, first.text
    reordered = await client.post(
        "/v1/orders",
        json={
            "metadata": {},
            "items": [{"unit_price": 10, "name": None, "quantity": 1, "sku": "A-1"}],
            "currency": "EUR",
        },
        headers={**user.headers, "Idempotency-Key": key},
    )
    assert reordered.headers["idempotent-replayed"] == "true"
    assert reordered.content == first.content


async def test_same_key_with_another_body_is_422_reused(
    client: httpx.AsyncClient, user: TestUser, sessionmaker: Sessionmaker
) -> None:
    key = new_key()
    first = await post_order(client, user, key)
    assert first.status_code == 201

    response = await post_order(client, user, key, currency="USD")

    assert_problem(response, 422, "idempotency-key-reused")
    assert "idempotent-replayed" not in response.headers
    assert await order_ids(sessionmaker, user.id) == [first.json()["id"]]


async def test_keys_are_scoped_to_the_user(
    client: httpx.AsyncClient, user: TestUser, other_user: TestUser
) -> None:
    key = new_key()
    mine = await post_order(client, user, key)
    theirs = await post_order(client, other_user, key, currency="USD")

    assert mine.status_code == theirs.status_code == 201
    assert "idempotent-replayed" not in theirs.headers
    assert theirs.json()["user_id"] == str(other_user.id)
    assert theirs.json()["id"] != mine.json()["id"]


async def test_a_key_in_flight_is_409_in_use(
    client: httpx.AsyncClient, user: TestUser, sessionmaker: Sessionmaker
) -> None:
    key = new_key()
    # Another transaction holds the key, exactly as a request that has not committed yet.
    async with sessionmaker() as holder, holder.begin():
        held = await holder.execute(
            text("SELECT pg_try_advisory_xact_lock(hashtextextended(:name, 0))"),
            {"name": lock_name(user.id, key)},
        )
        assert held.scalar_one()
        response = await post_order(client, user, key)
        assert_problem(response, 409, "idempotency-key-in-use")

    after = await post_order(client, user, key)
    assert after.status_code == 201
    assert "idempotent-replayed" not in after.headers
    assert len(await order_ids(sessionmaker, user.id)) == 1


async def test_fifty_concurrent_creates_with_one_key_make_one_order_and_one_event(
    client: httpx.AsyncClient, user: TestUser, sessionmaker: Sessionmaker
) -> None:
    key = new_key()

    responses = await asyncio.gather(*(post_order(client, user, key) for _ in range(50)))

    created = [
        r for r in responses if r.status_code == 201 and "idempotent-replayed" not in r.headers
    ]
    replayed = [r for r in responses if r.headers.get("idempotent-replayed") == "true"]
    in_use = [r for r in responses if r.status_code == 409]
    assert len(created) == 1
    assert len(created) + len(replayed) + len(in_use) == 50
    for response in in_use:
        assert_problem(response, 409, "idempotency-key-in-use")
    for response in replayed:
        assert response.status_code == 201
        assert response.content == created[0].content
    order_id = created[0].json()["id"]
    assert await order_ids(sessionmaker, user.id) == [order_id]
    assert [key for key, _ in await order_events(sessionmaker, order_id)] == ["order.created"]
    assert await key_rows(sessionmaker, user.id) == [key]


async def test_waves_of_twins_on_fresh_keys_each_make_exactly_one_order(
    client: httpx.AsyncClient, user: TestUser, sessionmaker: Sessionmaker
) -> None:
    # Twins arriving as the first commits are the ones whose snapshot can predate the
    # stored response while they take the freed lock: the statement must then neither
    # create a second order nor answer without a stored response (it runs again).
    keys = [new_key() for _ in range(20)]
    waves = [
        await asyncio.gather(*(post_order(client, user, key) for _ in range(10))) for key in keys
    ]
    for responses in waves:
        assert {r.status_code for r in responses} <= {201, 409}
        bodies = {r.content for r in responses if r.status_code == 201}
        assert len(bodies) == 1
    assert len(await order_ids(sessionmaker, user.id)) == len(keys)
    assert sorted(await key_rows(sessionmaker, user.id)) == sorted(keys)


VALID_KEYS = {
    "one char": "a",
    "255 chars": "k" * 255,
    "inner space": "order 42 / retry",
    "every printable": "".join(chr(c) for c in range(0x21, 0x7F)),
}


@pytest.mark.parametrize("key", VALID_KEYS.values(), ids=VALID_KEYS.keys())
async def test_printable_ascii_keys_up_to_255_are_accepted(
    client: httpx.AsyncClient, user: TestUser, key: str
) -> None:
    first = await post_order(client, user, key)
    assert first.status_code == 201, first.text
    again = await post_order(client, user, key)
    assert again.headers["idempotent-replayed"] == "true"


INVALID_KEYS: dict[str, str | bytes] = {
    "empty": "",
    "256 chars": "k" * 256,
    "non-ascii": "clé".encode(),
    "control char": b"abc\x01def",
    "delete char": b"abc\x7f",
}


@pytest.mark.parametrize("key", INVALID_KEYS.values(), ids=INVALID_KEYS.keys())
async def test_other_keys_are_422_validation_error(
    client: httpx.AsyncClient, user: TestUser, sessionmaker: Sessionmaker, key: str | bytes
) -> None:
    response = await post_order(client, user, key)

    body = assert_problem(response, 422, "validation-error")
    assert ["header", "Idempotency-Key"] in [error["loc"] for error in body["errors"]]
    assert await order_ids(sessionmaker, user.id) == []


async def test_a_refused_body_does_not_spend_the_key(
    client: httpx.AsyncClient, user: TestUser
) -> None:
    key = new_key()
    refused = await post_order(client, user, key, currency="eur")
    assert_problem(refused, 422, "validation-error")

    accepted = await post_order(client, user, key)
    assert accepted.status_code == 201
    assert "idempotent-replayed" not in accepted.headers


async def expire(sessionmaker: Sessionmaker, user_id: uuid.UUID, key: str) -> None:
    async with sessionmaker() as session, session.begin():
        await session.execute(
            text(
                "UPDATE idempotency_keys SET expires_at = now() - interval '1 second'"
                " WHERE user_id = :user_id AND key = :key"
            ),
            {"user_id": user_id, "key": key},
        )


async def test_keys_are_kept_for_the_configured_24_hours(
    client: httpx.AsyncClient, user: TestUser, sessionmaker: Sessionmaker
) -> None:
    key = new_key()
    assert (await post_order(client, user, key)).status_code == 201
    async with sessionmaker() as session:
        lifetime = (
            await session.execute(
                text(
                    "SELECT expires_at - created_at FROM idempotency_keys"
                    " WHERE user_id = :user_id AND key = :key"
                ),
                {"user_id": user.id, "key": key},
            )
        ).scalar_one()
    assert lifetime == timedelta(hours=24)


async def test_an_expired_key_counts_as_new(
    client: httpx.AsyncClient, user: TestUser, sessionmaker: Sessionmaker
) -> None:
    key = new_key()
    first = await post_order(client, user, key)
    await expire(sessionmaker, user.id, key)

    second = await post_order(client, user, key, currency="USD")

    assert second.status_code == 201, second.text
    assert "idempotent-replayed" not in second.headers
    assert second.json()["id"] != first.json()["id"]
    replay = await post_order(client, user, key, currency="USD")
    assert replay.headers["idempotent-replayed"] == "true"
    assert replay.json()["id"] == second.json()["id"]


async def insert_record(
    sessionmaker: Sessionmaker, user_id: uuid.UUID, key: str, ttl: timedelta
) -> None:
    """A stored first response for (user, key) that expires after `ttl` (negative: expired)."""
    async with sessionmaker() as session, session.begin():
        await session.execute(
            text(
                "INSERT INTO idempotency_keys (user_id, key, request_hash, status_code,"
                " response_body, order_id, expires_at)"
                " VALUES (:user_id, :key, :hash, 201, '{}', :order_id, now() + :ttl)"
            ),
            {
                "user_id": user_id,
                "key": key,
                "hash": b"\0" * 32,
                "order_id": uuid.uuid4(),
                "ttl": ttl,
            },
        )


async def test_sweep_deletes_only_expired_records(
    user: TestUser, sessionmaker: Sessionmaker
) -> None:
    for index in range(5):
        await insert_record(sessionmaker, user.id, f"old-{index}", timedelta(seconds=-1))
    await insert_record(sessionmaker, user.id, "live", timedelta(hours=1))
    sweeper = RetentionSweeper(sessionmaker, batch_size=2)

    deleted = (await sweeper.sweep())["idempotency_keys"]

    assert deleted >= 5  # other tests' expired records may go too
    assert await key_rows(sessionmaker, user.id) == ["live"]


async def test_sweep_skips_a_record_a_request_holds(
    user: TestUser, sessionmaker: Sessionmaker
) -> None:
    await insert_record(sessionmaker, user.id, "held", timedelta(seconds=-1))
    sweeper = RetentionSweeper(sessionmaker)
    async with sessionmaker() as holder, holder.begin():
        await holder.execute(
            text("SELECT 1 FROM idempotency_keys WHERE user_id = :id AND key = 'held' FOR UPDATE"),
            {"id": user.id},
        )
        await asyncio.wait_for(sweeper.sweep(), timeout=5)  # returns instead of waiting
        assert await key_rows(sessionmaker, user.id) == ["held"]
    await sweeper.sweep()
    assert await key_rows(sessionmaker, user.id) == []


async def test_the_background_sweeper_removes_expired_records(
    user: TestUser, sessionmaker: Sessionmaker
) -> None:
    await insert_record(sessionmaker, user.id, "stale", timedelta(seconds=-1))
    # One process of the fleet sweeps per interval (a lease): the test app's sweeper may
    # hold it for its 300 s, so hand it over as a stopping process would.
    async with sessionmaker() as session, session.begin():
        await session.execute(text("DELETE FROM housekeeping_leases"))
    sweeper = RetentionSweeper(sessionmaker, interval=0.05)
    sweeper.start()
    try:
        deadline = time.monotonic() + 10
        while await key_rows(sessionmaker, user.id) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
    finally:
        await sweeper.close()
    assert await key_rows(sessionmaker, user.id) == []
