"""One trace per order change (SPEC §14): HTTP, SQL, the outbox, the relay and the consumer.

Traced services run as real processes exporting OTLP/HTTP to a receiver in this test,
which decodes `opentelemetry-proto`; the in-process test app shows the off state.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import aio_pika
import httpx
from opentelemetry import trace
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from sqlalchemy import select

from api import tracing
from api.configs import Settings
from api.database.connection import create_engine, create_sessionmaker
from api.helpers.orjson_coder import dumps, loads
from api.models import OutboxEvent
from tests.event_helpers import observe_events, scratch_events_environment, settings_env
from tests.factories import make_user, order_payload
from tests.faults.service import running_service

SPAN_KIND_SERVER, SPAN_KIND_PRODUCER, SPAN_KIND_CONSUMER = 2, 4, 5


@dataclass(frozen=True)
class Span:
    trace_id: str
    span_id: str
    parent_span_id: str
    name: str
    kind: int
    service: str
    attributes: dict[str, Any]


@dataclass
class Receiver:
    """An OTLP/HTTP trace receiver on a loopback port, collecting every span sent to it."""

    port: int = 0
    spans: list[Span] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def collect(self, body: bytes) -> None:
        request = ExportTraceServiceRequest()
        request.ParseFromString(body)
        found: list[Span] = []
        for resource_spans in request.resource_spans:
            service = next(
                (
                    attr.value.string_value
                    for attr in resource_spans.resource.attributes
                    if attr.key == "service.name"
                ),
                "",
            )
            for scope_spans in resource_spans.scope_spans:
                found.extend(
                    Span(
                        trace_id=span.trace_id.hex(),
                        span_id=span.span_id.hex(),
                        parent_span_id=span.parent_span_id.hex(),
                        name=span.name,
                        kind=span.kind,
                        service=service,
                        attributes={attr.key: _value(attr.value) for attr in span.attributes},
                    )
                    for span in scope_spans.spans
                )
        with self.lock:
            self.spans.extend(found)

    def in_trace(self, trace_id: str) -> list[Span]:
        with self.lock:
            return [span for span in self.spans if span.trace_id == trace_id]

    async def wait_for(
        self, predicate: Callable[[list[Span]], bool], trace_id: str, timeout: float = 20
    ) -> list[Span]:
        deadline = time.monotonic() + timeout
        while not predicate(spans := self.in_trace(trace_id)):
            if time.monotonic() > deadline:
                names = [(s.name, s.kind) for s in spans]
                raise TimeoutError(f"trace {trace_id}: condition not met; spans: {names}")
            await asyncio.sleep(0.1)
        return spans


def _value(value: Any) -> Any:
    kind = value.WhichOneof("value")
    return getattr(value, kind) if kind else None


@contextlib.contextmanager
def otlp_receiver() -> Iterator[Receiver]:
    receiver = Receiver()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            if self.path == "/v1/traces":
                receiver.collect(body)
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            """Quiet: the test output is for failures."""

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    receiver.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        server.shutdown()
        server.server_close()


def traceparent() -> tuple[str, str, str]:
    """A fresh sampled W3C traceparent, with its trace id and parent span id."""
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{span_id}-01", trace_id, span_id


def trace_of(header: str) -> str:
    return header.split("-")[1]


def tracing_env(receiver: Receiver, **extra: str) -> dict[str, str]:
    return {
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
        "OTEL_BSP_SCHEDULE_DELAY": "100",
        "OTEL_SERVICE_NAME": "orders-api-test",
        **extra,
    }


async def test_tracing_is_off_without_an_endpoint(
    client: httpx.AsyncClient, settings: Settings, sessionmaker: Any, user: Any
) -> None:
    """The in-process app has no OTLP endpoint: no SDK, no exporter thread, no context kept."""
    response = await client.post("/v1/orders", json=order_payload(), headers=user.headers)
    assert response.status_code == 201
    assert not tracing.tracing_enabled()
    assert type(trace.get_tracer_provider()).__name__ == "ProxyTracerProvider"
    assert "opentelemetry.sdk.trace" not in sys.modules
    assert not any("OtelBatchSpanProcessor" in t.name for t in threading.enumerate())
    async with sessionmaker() as session:
        row = (
            await session.execute(
                select(OutboxEvent.traceparent, OutboxEvent.body).where(
                    OutboxEvent.body.contains(response.json()["id"].encode())
                )
            )
        ).one()
    assert row.traceparent is None
    assert "traceparent" not in loads(row.body)


async def test_one_trace_from_the_request_through_the_outbox_relay_and_consumer(
    settings: Settings, tmp_path: Path
) -> None:
    with otlp_receiver() as receiver:
        async with (
            scratch_events_environment(settings) as scratch,
            observe_events(scratch) as observer,
            running_service(scratch, tmp_path, **tracing_env(receiver, LOGLEVEL="INFO")) as service,
        ):
            engine = create_engine(scratch)
            try:
                user = await make_user(create_sessionmaker(engine), scratch)
            finally:
                await engine.dispose()

            # 1. The storefront's request continues its own trace through the service.
            header, trace_id, caller_span = traceparent()
            async with service.client() as client:
                response = await client.post(
                    "/v1/orders",
                    json=order_payload(),
                    headers={**user.headers, "traceparent": header, "Idempotency-Key": "t-1"},
                )
            assert response.status_code == 201, response.text
            order_id = response.json()["id"]

            # The relay's span and the request's may come from different workers, each
            # exporting on its own schedule.
            spans = await receiver.wait_for(
                lambda found: {SPAN_KIND_SERVER, SPAN_KIND_PRODUCER} <= {s.kind for s in found},
                trace_id,
            )
            server = next(s for s in spans if s.kind == SPAN_KIND_SERVER)
            assert server.name == "POST /v1/orders"
            assert server.parent_span_id == caller_span
            assert server.service == "orders-api-test"
            assert server.attributes["http.route"] == "/v1/orders"
            assert not any("authorization" in key.lower() for key in server.attributes)
            sql = [s for s in spans if s.attributes.get("db.system") == "postgresql"]
            assert sql, [s.name for s in spans]
            assert all(s.parent_span_id for s in sql)
            # The limiter's script, sent in the auto-pipeline's batch of that loop pass.
            assert any(s.attributes.get("db.system") == "redis" for s in spans), [
                (s.name, s.attributes) for s in spans
            ]

            # The message and its envelope carry the request's trace.
            await observer.wait_for(lambda seen: len(seen.for_order(order_id)) == 1)
            message = observer.for_order(order_id)[0]
            assert message.headers is not None
            assert trace_of(str(message.headers["traceparent"])) == trace_id
            envelope = loads(message.body)
            assert trace_of(envelope["traceparent"]) == trace_id
            producer = next(s for s in spans if s.kind == SPAN_KIND_PRODUCER)
            assert str(message.headers["traceparent"]).split("-")[2] == producer.span_id
            assert producer.attributes["messaging.message.id"] == message.message_id

            # 2. A processor's status message with its own trace: the consumer continues it,
            # and the event the change emits carries it on.
            status_header, status_trace, status_span = traceparent()
            connection = await aio_pika.connect(scratch.rabbitmq_url, timeout=10)
            async with connection:
                channel = await connection.channel()
                await channel.default_exchange.publish(
                    aio_pika.Message(
                        dumps({"order_id": order_id, "status": "paid"}),
                        content_type="application/json",
                        message_id=f"trace-{order_id}",
                        headers={"traceparent": status_header},
                    ),
                    routing_key=scratch.RMQ_STATUS_QUEUE,
                )
            await observer.wait_for(lambda seen: len(seen.for_order(order_id)) == 2)
            paid = observer.for_order(order_id)[1]
            assert paid.routing_key == "order.paid"
            assert trace_of(loads(paid.body)["traceparent"]) == status_trace
            assert paid.headers is not None
            assert trace_of(str(paid.headers["traceparent"])) == status_trace
            status_spans = await receiver.wait_for(
                lambda found: {SPAN_KIND_CONSUMER, SPAN_KIND_PRODUCER} <= {s.kind for s in found},
                status_trace,
            )
            consumer = next(s for s in status_spans if s.kind == SPAN_KIND_CONSUMER)
            assert consumer.parent_span_id == status_span
            assert any(s.parent_span_id == consumer.span_id for s in status_spans)

            # Log lines written inside the request's span name its trace.
            lines = [
                json.loads(line) for line in service.log().splitlines() if line.startswith("{")
            ]
            assert any(line.get("trace_id") == trace_id and line.get("span_id") for line in lines)


async def test_an_event_published_later_by_another_process_keeps_the_request_trace(
    settings: Settings, tmp_path: Path
) -> None:
    with otlp_receiver() as receiver:
        async with (
            scratch_events_environment(settings) as scratch,
            observe_events(scratch) as observer,
        ):
            header, trace_id, _ = traceparent()
            env = tracing_env(receiver, OUTBOX_RELAY_ENABLED="false")
            async with running_service(scratch, tmp_path, **env) as service:
                engine = create_engine(scratch)
                try:
                    user = await make_user(create_sessionmaker(engine), scratch)
                finally:
                    await engine.dispose()
                async with service.client() as client:
                    response = await client.post(
                        "/v1/orders",
                        json=order_payload(),
                        headers={**user.headers, "traceparent": header},
                    )
                assert response.status_code == 201
            # The API is gone and nothing was published; a relay process starts later.
            assert observer.messages == []
            relay = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "api.relay",
                env=settings_env(scratch, **tracing_env(receiver)),
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
            )
            try:
                await observer.wait_for(lambda seen: len(seen.messages) == 1, timeout=30)
                spans = await receiver.wait_for(
                    lambda found: {SPAN_KIND_SERVER, SPAN_KIND_PRODUCER} <= {s.kind for s in found},
                    trace_id,
                )
            finally:
                relay.terminate()
                await asyncio.wait_for(relay.communicate(), 30)
            message = observer.messages[0]
            assert message.headers is not None
            assert trace_of(str(message.headers["traceparent"])) == trace_id
            producer = next(s for s in spans if s.kind == SPAN_KIND_PRODUCER)
            server = next(s for s in spans if s.kind == SPAN_KIND_SERVER)
            # The publish hangs off the request's span, whose context the outbox row kept.
            assert producer.parent_span_id == server.span_id
