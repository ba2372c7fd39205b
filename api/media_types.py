"""Bodies are JSON: a route that reads a JSON body answers 415 to any other content type.

FastAPI would hand such a body to validation as bytes and answer 422 "Input should
be a valid dictionary"; the client's mistake is the media type (SPEC §3). Routes
that read a form (the OAuth2 token route) or their raw body (the redirect gateway)
have no JSON body field and are left alone.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Iterable
from email.message import Message
from typing import Any

from fastapi import Request, Response, params
from fastapi.routing import APIRoute
from starlette.routing import BaseRoute
from starlette.types import Scope

from api.errors import UnsupportedMediaType

JSON_MEDIA_TYPE = "application/json"


def is_json_media_type(content_type: str) -> bool:
    """`application/json` or any `application/*+json`, parameters aside."""
    message = Message()
    message["content-type"] = content_type
    if message.get_content_maintype() != "application":
        return False
    subtype = message.get_content_subtype()
    return subtype == "json" or subtype.endswith("+json")


def _declares_body(scope: Scope) -> tuple[str | None, bool]:
    """(the Content-Type header, whether the request says it has a body)."""
    content_type: str | None = None
    has_body = False
    for name, value in scope["headers"]:
        if name == b"content-type":
            content_type = value.decode("latin-1")
        elif name == b"content-length":
            has_body = has_body or value.strip() not in (b"", b"0")
        elif name == b"transfer-encoding":
            has_body = True
    return content_type, has_body


def refuse_non_json_body(scope: Scope) -> None:
    """415 when the request declares a body (or a Content-Type) that is not JSON."""
    content_type, has_body = _declares_body(scope)
    # No Content-Type and no body is a missing body: validation answers that (422).
    if (content_type is not None or has_body) and not is_json_media_type(content_type or ""):
        raise UnsupportedMediaType(
            f"The request body must be {JSON_MEDIA_TYPE}; got {content_type or 'no Content-Type'}.",
            # RFC 9110 §15.5.16: `Accept` names the media types that would do.
            headers={"Accept": JSON_MEDIA_TYPE},
        )


def has_json_body(route: APIRoute) -> bool:
    field = route.body_field
    return field is not None and not isinstance(field.field_info, params.Form)


class JSONBodyRoute(APIRoute):
    """The route class of our routers: a route with a JSON body field refuses other media types.

    FastAPI's documented hook for wrapping a route's handler (`get_route_handler`); the
    check runs before the body is read or any dependency is solved.
    """

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        if not has_json_body(self):
            return handler

        async def json_only(request: Request) -> Response:
            refuse_non_json_body(request.scope)
            return await handler(request)

        return json_only


def check_json_body_routes(routes: Iterable[BaseRoute]) -> None:
    """Refuse to build an app with a JSON-body route that would not answer 415."""
    for route in routes:
        if not isinstance(route, APIRoute) or isinstance(route, JSONBodyRoute):
            continue
        if has_json_body(route):
            raise TypeError(f"{route.path}: its router needs route_class=JSONBodyRoute")
