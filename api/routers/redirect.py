"""The redirect gateway (SPEC §9): an authenticated HTTP call in, a RabbitMQ request/reply out."""

from __future__ import annotations

import base64
import logging
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, Request, Response
from pydantic import ValidationError

from api.database.connection import SessionDep
from api.dependencies.caller import CurrentUser
from api.dependencies.limits import rate_limit
from api.errors import (
    BadGateway,
    NotFound,
    ServiceUnavailable,
    UpstreamTimeout,
    malformed_json,
)
from api.helpers.auth import Principal
from api.helpers.orjson_coder import dumps, loads
from api.rabbit_core.client import RabbitUnavailable
from api.rabbit_core.rpc import RpcTimeout, RpcUnroutable
from api.schemas.redirect import BASE64, RedirectReply, RedirectRequest
from api.state import get_state

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/redirect", tags=["redirect"], dependencies=[rate_limit("default")])

METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")

# Besides these, every `x-` header except `x-forwarded-*` is forwarded; nothing else
# (so never `authorization` or `cookie`): the caller's identity travels in `user`.
FORWARDED_HEADERS = frozenset({"accept", "accept-language", "content-type", "user-agent"})

# Reply headers the gateway owns: hop-by-hop fields, framing it computes itself, its
# request id, and the CORS and rate-limit fields that state its own policy.
RESERVED_REPLY_HEADERS = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "content-length",
        "x-request-id",
        "ratelimit",
        "ratelimit-policy",
    }
)
RESERVED_REPLY_PREFIXES = ("access-control-",)


async def get_gateway_user(user: CurrentUser, session: SessionDep) -> Principal:
    """`CurrentUser`, with the request's transaction ended as soon as the caller is known.

    A gateway call waits up to REDIRECT_TIMEOUT for another service; the pooled
    connection goes back first.
    """
    await session.commit()
    return user


GatewayUser = Annotated[Principal, Depends(get_gateway_user)]


async def redirect(service: str, path: str, request: Request, user: GatewayUser) -> Response:
    """Forward the call to an internal service over RabbitMQ and return its reply."""
    state = get_state(request)
    settings = state["settings"]
    if service not in settings.REDIRECT_SERVICES:
        raise NotFound("No such service.")
    message = await build_request_message(request, path=path, user=user)
    try:
        raw_reply = await state["rpc"].call(
            service, dumps(message), timeout=settings.REDIRECT_TIMEOUT
        )
    except RpcUnroutable:
        raise ServiceUnavailable(f"The {service} service is not available.") from None
    except RpcTimeout:
        raise UpstreamTimeout(f"The {service} service did not answer in time.") from None
    except RabbitUnavailable:
        raise ServiceUnavailable("The message broker is unavailable; retry shortly.") from None
    return reply_response(service, raw_reply)


# The service's reply becomes the response, whatever its status; these are the gateway's own.
GATEWAY_RESPONSES: dict[int | str, dict[str, Any]] = {
    "default": {"description": "The status, headers and body the service replied with."},
    404: {"description": "No such service."},
    502: {"description": "The service sent a malformed reply."},
    503: {"description": "The service or the message broker is not available."},
    504: {"description": "The service did not answer within REDIRECT_TIMEOUT."},
}

for _method in METHODS:
    # One route per method, so each gets its own OpenAPI operation id.
    router.add_api_route(
        "/{service}/{path:path}",
        redirect,
        methods=[_method],
        name=f"redirect_{_method.lower()}",
        summary=f"Forward a {_method} to an internal service",
        responses=GATEWAY_RESPONSES,
    )


async def build_request_message(request: Request, *, path: str, user: Principal) -> RedirectRequest:
    """The request message of SPEC §9 for this HTTP call."""
    request_id: str = request.scope["state"]["request_id"]
    message: RedirectRequest = {
        "method": request.method,
        "path": "/" + path,
        "query": forwarded_query(request),
        "headers": forwarded_headers(request, request_id),
        "body": None,
        "user": {"id": str(user.id), "role": user.role.value},
        "request_id": request_id,
    }
    raw = await request.body()
    if not raw:
        return message
    if is_json(request.headers.get("content-type", "")):
        message["body"] = parse_json_body(raw)
    else:
        message["body"] = base64.b64encode(raw).decode("ascii")
        message["body_encoding"] = BASE64
    return message


def forwarded_query(request: Request) -> dict[str, list[str]]:
    query: dict[str, list[str]] = {}
    for name, value in request.query_params.multi_items():
        query.setdefault(name, []).append(value)
    return query


def forwarded_headers(request: Request, request_id: str) -> dict[str, str]:
    """The safe subset of the caller's headers, names in lower case, repeats comma-joined."""
    headers: dict[str, str] = {}
    for raw_name, raw_value in request.headers.raw:
        name = raw_name.decode("latin-1").lower()
        if name in FORWARDED_HEADERS or (
            name.startswith("x-") and not name.startswith("x-forwarded-")
        ):
            value = raw_value.decode("latin-1")
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
    # The effective id: the caller's when it was valid, else the one this service assigned.
    headers["x-request-id"] = request_id
    return headers


def is_json(content_type: str) -> bool:
    media_type = content_type.split(";", 1)[0].strip().lower()
    return media_type == "application/json" or media_type.endswith("+json")


def parse_json_body(raw: bytes) -> Any:
    try:
        return loads(raw)
    except orjson.JSONDecodeError:
        raise malformed_json() from None


def reply_response(service: str, raw_reply: bytes) -> Response:
    """The HTTP response a reply message describes; a malformed reply is a 502."""
    try:
        reply = RedirectReply.model_validate_json(raw_reply)
    except ValidationError as exc:
        # Where and why only: the reply's content may be private.
        problems = [{"loc": err["loc"], "type": err["type"]} for err in exc.errors()]
        logger.warning("malformed rpc reply", extra={"service": service, "problems": problems})
        raise BadGateway(f"The {service} service sent a malformed reply.") from None
    headers = {
        name.lower(): value
        for name, value in reply.headers.items()
        if name.lower() not in RESERVED_REPLY_HEADERS
        and not name.lower().startswith(RESERVED_REPLY_PREFIXES)
    }
    content = reply.content
    if reply.status in (204, 304):
        content = b""  # these statuses carry no body
    media_type = None
    if content and "content-type" not in headers:
        media_type = "application/octet-stream" if reply.body_encoding else "application/json"
    return Response(content, status_code=reply.status, headers=headers, media_type=media_type)
