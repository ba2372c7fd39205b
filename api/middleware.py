"""The outermost ASGI middleware (request id, body limit, access log line, metrics) and CORS.

It is plain ASGI (no `BaseHTTPMiddleware`), so a request costs one wrapper call and
streaming responses are not buffered.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import BadRequest, InternalError, PayloadTooLarge, problem_response
from api.helpers.logger import request_id_var
from api.helpers.request_ids import new_request_id, valid_request_id
from api.metrics import http_latency, http_requests

MAX_BODY_BYTES = 1024 * 1024

access_log = logging.getLogger("api.access")


def _incoming_request_id(scope: Scope) -> str:
    for name, value in scope["headers"]:
        if name == b"x-request-id":
            text = bytes(value).decode("latin-1")
            if valid_request_id(text):
                return text
            break
    return new_request_id()


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _route_template(scope: Scope) -> str:
    """The metrics label: the matched route's template; `unmatched` only for unknown paths."""
    template = getattr(scope.get("route"), "path_format", None)
    if template:
        return str(template)
    # Answered before routing (a CORS preflight, the body cap): labelled with the route
    # whose path it names. Only these requests pay for the search.
    for route in getattr(getattr(scope.get("app"), "router", None), "routes", ()):
        regex = getattr(route, "path_regex", None)
        if regex is not None and regex.match(scope["path"]):
            return str(route.path_format)
    return "unmatched"


class RequestContextMiddleware:
    """Assigns `X-Request-ID`, caps bodies at 1 MiB, logs one JSON line and records metrics."""

    def __init__(self, app: ASGIApp, *, max_body_bytes: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        started = time.perf_counter()
        request_id = _incoming_request_id(scope)
        token = request_id_var.set(request_id)
        # A per-request copy of the lifespan state (uvicorn copies it; other servers and
        # test transports may hand every request the same dict).
        state: dict[str, Any] = dict(scope.get("state", ()))
        scope["state"] = state
        state["request_id"] = request_id
        header_value = request_id.encode("ascii")
        status = 500
        started_response = False
        method = scope["method"]
        head = method == "HEAD"
        if head:
            # Every GET route answers HEAD (RFC 9110 §9.3.2): the app serves the GET and
            # the body is dropped here. The server keeps its own scope, which still says
            # HEAD, so it sends no body either.
            scope = {**scope, "method": "GET"}

        async def send_with_id(message: Message) -> None:
            nonlocal status, started_response
            if head and message["type"] == "http.response.body":
                message = {**message, "body": b""}
            elif message["type"] == "http.response.start":
                status = message["status"]
                started_response = True
                message["headers"] = [
                    *message.get("headers", ()),
                    (b"x-request-id", header_value),
                    # Set by dependencies (rate-limit fields) for success and error alike.
                    *state.get("response_headers", ()),
                ]
            await send(message)

        received = 0
        limit = self.max_body_bytes

        async def receive_capped() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise PayloadTooLarge(f"Request bodies are limited to {limit} bytes.")
            return message

        try:
            length = _content_length(scope)
            # A declared length is enforced by the HTTP parser, so it is checked once, here;
            # without one (chunked) the bytes are counted as they arrive.
            app_receive = receive if length is not None else receive_capped
            if length is not None and length > limit:
                too_large = PayloadTooLarge(
                    f"Request bodies are limited to {limit} bytes.", headers={"Connection": "close"}
                )
                await problem_response(scope, too_large)(scope, receive, send_with_id)
            else:
                await self.app(scope, app_receive, send_with_id)
        except Exception:
            # The one place an unexpected fault becomes a response: a generic 500
            # problem with the request id, the trace only in the log.
            access_log.exception("unhandled error")
            if not started_response:
                internal = InternalError("An unexpected error occurred.")
                await problem_response(scope, internal)(scope, receive, send_with_id)
        finally:
            duration = time.perf_counter() - started
            template = _route_template(scope)
            http_requests(method, template, status).inc()
            http_latency(method, template).observe(duration)
            if access_log.isEnabledFor(logging.INFO):
                access_log.info(
                    "request",
                    extra={
                        "method": method,
                        "path": scope["path"],
                        "status": status,
                        "duration_ms": round(duration * 1000, 2),
                        "user_id": state.get("user_id"),
                    },
                )
            request_id_var.reset(token)


class _RefusedPreflight(Response):
    """A refused CORS preflight as problem+json; the body needs the request's path and id."""

    def __init__(self, refusal: BadRequest) -> None:
        super().__init__(status_code=refusal.status_code)
        self.refusal = refusal

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await problem_response(scope, self.refusal)(scope, receive, send)


class ProblemCORSMiddleware(CORSMiddleware):
    """Starlette's CORS handling; a refused preflight is problem+json like every error."""

    def preflight_response(self, request_headers: Headers) -> Response:
        response = super().preflight_response(request_headers=request_headers)
        if response.status_code != BadRequest.status:
            return response
        # Starlette's text names what was refused ("Disallowed CORS origin, headers").
        cors_headers = {
            name.decode("latin-1"): value.decode("latin-1")
            for name, value in response.raw_headers
            if name not in (b"content-type", b"content-length")
        }
        return _RefusedPreflight(BadRequest(bytes(response.body).decode(), headers=cors_headers))
