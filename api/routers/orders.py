"""Orders: place, list, read, cancel, and the admin status change (SPEC §4, §5)."""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Query, Request, Response
from sqlalchemy.ext.asyncio import AsyncSession

from api.database.connection import SessionDep, raw_connection
from api.database.query import orders as order_queries
from api.dependencies import cached_read
from api.dependencies.caller import (
    BEARER_SECURITY,
    AdminUser,
    CurrentUser,
    bearer_token,
    get_current_user,
    token_subject,
)
from api.dependencies.limits import limited_creator, rate_limit
from api.errors import PROBLEM_CONTENT_TYPE, Forbidden, NotFound, ValidationFailed
from api.helpers.auth import Principal
from api.helpers.enums import OrderStatus
from api.helpers.etags import if_match_versions, none_match, order_etag
from api.helpers.logger import request_id_var
from api.helpers.pagination import InvalidCursor
from api.media_types import JSONBodyRoute
from api.schemas.orders import OrderCreate, OrderPage, OrderRead, OrderStatusUpdate
from api.services import orders as order_service
from api.services.idempotency import IDEMPOTENCY_KEY_PATTERN, CreateOutcome, create_order_once
from api.services.orders import INITIAL_VERSION, EncodedOrder
from api.state import get_state

router = APIRouter(prefix="/v1/orders", tags=["orders"], route_class=JSONBodyRoute)

JSON = "application/json"
# No order is ever at version 0, so expecting it always fails the precondition.
NO_VERSION = 0


def _problems(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {status: {"content": {PROBLEM_CONTENT_TYPE: {}}} for status in statuses}


IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        pattern=IDEMPOTENCY_KEY_PATTERN,
        description="1-255 printable ASCII characters; retries with it create one order.",
    ),
]
IfMatch = Annotated[
    str | None,
    Header(alias="If-Match", description="Apply only if the order still has this ETag."),
]
# Read from the request by the cached `GET /{order_id}` (no Header dependency), so
# documented here.
IF_NONE_MATCH_PARAMETER = {
    "name": "If-None-Match",
    "in": "header",
    "required": False,
    "schema": {"type": "string"},
    "description": "304 when the order still has this ETag.",
}


def owner_scope(user: Principal) -> uuid.UUID | None:
    """Whose orders the caller may touch: their own, or every order (None) for an admin."""
    return None if user.is_admin else user.id


def order_response(
    order: EncodedOrder, *, status_code: int = 200, headers: dict[str, str] | None = None
) -> Response:
    return Response(
        order.body,
        status_code=status_code,
        media_type=JSON,
        headers={"ETag": order.etag, **(headers or {})},
    )


async def expected_version(
    session: AsyncSession, *, order_id: uuid.UUID, owner_id: uuid.UUID | None, if_match: str | None
) -> int | None:
    """The version an `If-Match` demands, or None when there is no condition (or `*`)."""
    if if_match is None:
        return None
    versions = if_match_versions(if_match, order_id)
    if versions is None:
        return None
    if len(versions) <= 1:
        return next(iter(versions), NO_VERSION)
    # Several tags of this order: the current version if listed. transition_order checks
    # it again under the row lock, so a change in between still fails the precondition.
    current = await order_queries.get_order_version(session, order_id=order_id, owner_id=owner_id)
    return current if current in versions else NO_VERSION


async def _transition(
    request: Request,
    session: AsyncSession,
    user: Principal,
    order_id: uuid.UUID,
    target: OrderStatus,
    if_match: str | None,
) -> Response:
    owner_id = owner_scope(user)
    version = await expected_version(
        session, order_id=order_id, owner_id=owner_id, if_match=if_match
    )
    transition = await order_service.transition_order(
        session,
        order_id=order_id,
        target=target,
        request_id=request_id_var.get(),
        owner_id=owner_id,
        expected_version=version,
    )
    # Committed here, so the cached reads it makes stale are bumped before the response.
    await session.commit()
    await cached_read.invalidate_after_write(request, transition.order.user_id, order_id)
    return order_response(order_service.encode_order(transition.order))


@router.post(
    "",
    status_code=201,
    response_model=OrderRead,
    responses=_problems(401, 409, 422, 429),
    openapi_extra={"security": BEARER_SECURITY},
)
async def create_order(
    payload: OrderCreate,
    user_id: Annotated[uuid.UUID, Depends(limited_creator)],
    request: Request,
    idempotency_key: IdempotencyKey = None,
) -> Response:
    """Place an order; line and order totals are computed by the server.

    With an `Idempotency-Key`, a retry of the same body returns the first response
    again (`Idempotent-Replayed: true`) and creates nothing.
    """
    state = get_state(request)
    request_id = request_id_var.get()
    async with raw_connection(state["engine"]) as conn:
        if idempotency_key is None:
            order = await order_service.create_order(
                conn, user_id=user_id, payload=payload, request_id=request_id
            )
            outcome = CreateOutcome(201, order.body, order.id, replayed=False)
        else:
            outcome = await create_order_once(
                conn,
                user_id=user_id,
                key=idempotency_key,
                payload=payload,
                request_id=request_id,
                ttl=timedelta(hours=state["settings"].IDEMPOTENCY_TTL_HOURS),
            )
    # Committed (one statement): the owner's and admins' cached reads are stale from now on.
    if not outcome.replayed:
        await cached_read.invalidate_after_write(request, user_id)
    headers = {"Idempotent-Replayed": "true"} if outcome.replayed else {}
    if outcome.order_id is not None:
        headers["Location"] = _location(outcome.order_id)
        headers["ETag"] = order_etag(outcome.order_id, INITIAL_VERSION)
    return Response(outcome.body, status_code=outcome.status_code, media_type=JSON, headers=headers)


def _location(order_id: uuid.UUID) -> str:
    return f"{router.prefix}/{order_id}"


@router.get(
    "",
    response_model=OrderPage,
    responses=_problems(401, 403, 422, 429),
    openapi_extra={"security": BEARER_SECURITY},
)
async def list_orders(
    request: Request,
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: Annotated[
        str | None, Query(max_length=64, description="`next_cursor` of the previous page.")
    ] = None,
    status: Annotated[OrderStatus | None, Query()] = None,
    user_id: Annotated[
        uuid.UUID | None, Query(description="Admins only: one user's orders.")
    ] = None,
) -> Response:
    """The caller's orders, newest first; admins see every order and may filter by user."""
    token = bearer_token(request)
    page_key = f"orders:{limit}:{cursor or ''}:{status or ''}:{user_id or ''}"
    found = await cached_read.lookup(request, token, page_key)
    if found.cached is not None:
        return Response(found.cached.body, media_type=JSON, headers=found.headers())

    async def load() -> bytes:
        # On a miss only: a hit touches no database (the session connects on first use).
        user = await get_current_user(request, session, token)
        owner_id = owner_scope(user)
        if user_id is not None:
            if owner_id is None:
                owner_id = user_id
            elif user_id != owner_id:
                raise Forbidden("Only admins may list another user's orders.")
        try:
            page = await order_service.read_order_page(
                session, owner_id=owner_id, status=status, cursor=cursor, limit=limit
            )
        except InvalidCursor as exc:
            raise ValidationFailed(
                "The request is not valid.",
                errors=[{"loc": ["query", "cursor"], "msg": str(exc), "type": "value_error"}],
            ) from None
        await cached_read.fill(request, found, user, "", page)
        return page

    body = await cached_read.load_once(found, load)
    return Response(body, media_type=JSON, headers=found.headers())


@router.get(
    "/{order_id}",
    response_model=OrderRead,
    responses={304: {"description": "Not modified"}, **_problems(401, 404, 422, 429)},
    openapi_extra={"security": BEARER_SECURITY, "parameters": [IF_NONE_MATCH_PARAMETER]},
)
async def get_order(order_id: uuid.UUID, request: Request) -> Response:
    """One order, with its `ETag`; `If-None-Match` with the current tag answers 304."""
    token = bearer_token(request)
    found = await cached_read.lookup(request, token, f"order:{order_id}", order_id=order_id)
    if found.cached is not None:
        etag, body = found.cached.etag, found.cached.body
    else:

        async def load() -> tuple[str, bytes]:
            viewer_id = token_subject(request, token)
            async with raw_connection(get_state(request)["engine"]) as conn:
                viewer, order = await order_service.read_order_as(
                    conn, order_id=order_id, viewer_id=viewer_id
                )
            if order is None:
                raise NotFound("No such order.")
            await cached_read.fill(request, found, viewer, order.etag, order.body)
            return order.etag, order.body

        etag, body = await cached_read.load_once(found, load)
    headers = {"ETag": etag, **found.headers()}
    if_none_match = request.headers.get("if-none-match")
    if if_none_match is not None and none_match(if_none_match, etag):
        return Response(status_code=304, headers=headers)
    return Response(body, media_type=JSON, headers=headers)


@router.post(
    "/{order_id}/cancel",
    response_model=OrderRead,
    responses=_problems(401, 404, 409, 412, 422, 429),
    dependencies=[rate_limit("default")],
)
async def cancel_order(
    order_id: uuid.UUID,
    request: Request,
    user: CurrentUser,
    session: SessionDep,
    if_match: IfMatch = None,
) -> Response:
    """Cancel a `pending` or `paid` order (its owner or an admin)."""
    return await _transition(request, session, user, order_id, OrderStatus.CANCELLED, if_match)


@router.patch(
    "/{order_id}",
    response_model=OrderRead,
    responses=_problems(401, 403, 404, 409, 412, 422, 429),
    dependencies=[rate_limit("default")],
)
async def update_order_status(
    order_id: uuid.UUID,
    request: Request,
    change: OrderStatusUpdate,
    admin: AdminUser,
    session: SessionDep,
    if_match: IfMatch = None,
) -> Response:
    """Admins: move an order through the state machine; `If-Match` guards against lost updates."""
    return await _transition(request, session, admin, order_id, change.status, if_match)
