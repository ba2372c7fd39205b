"""A reference responder for the redirect gateway: `python -m api.rpc_echo SERVICE`.

It binds the queue `<RMQ_RPC_EXCHANGE>.<SERVICE>` to the RPC exchange with the
service name as routing key and answers every request with status 200 and the
request message itself as the JSON body, so a developer can see exactly what the
gateway sends. Add SERVICE to REDIRECT_SERVICES and call
`/v1/redirect/SERVICE/any/path`. Several copies share the queue; the queue goes
away with the last one, and the gateway then answers 503 at once.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage

from api.configs import Settings, load_settings
from api.helpers.backoff import reconnect_forever
from api.helpers.logger import configure_logging
from api.helpers.orjson_coder import dumps, loads
from api.rabbit_core.client import CLOSE_TIMEOUT, RabbitClient, until_closed
from api.rabbit_core.topology import TopologyNames

logger = logging.getLogger("api.rpc_echo")

PREFETCH = 32


def echo_reply(service: str, request_body: bytes) -> dict[str, Any]:
    """The reply message for one request: the request echoed back, or 400 if it is not JSON."""
    headers = {"content-type": "application/json", "x-echo-service": service}
    try:
        request = loads(request_body)
    except ValueError:
        return {"status": 400, "headers": headers, "body": {"error": "the request is not JSON"}}
    return {"status": 200, "headers": headers, "body": request}


async def answer(channel: AbstractChannel, service: str, message: AbstractIncomingMessage) -> None:
    """Publish the reply to the caller's reply-to address, then ack the request."""
    async with message.process(requeue=False):
        if not message.reply_to:
            logger.warning("request without reply_to dropped", extra={"service": service})
            return
        reply = aio_pika.Message(
            dumps(echo_reply(service, message.body)),
            content_type="application/json",
            correlation_id=message.correlation_id,
        )
        await channel.default_exchange.publish(reply, routing_key=message.reply_to)


async def declare_rpc_exchange(channel: AbstractChannel, names: TopologyNames) -> None:
    await channel.declare_exchange(names.rpc_exchange, aio_pika.ExchangeType.DIRECT, durable=True)


async def serve(
    settings: Settings,
    service: str,
    *,
    stop: asyncio.Event,
    ready: asyncio.Event | None = None,
) -> None:
    """Answer requests for `service` until `stop` is set, on any node of `RMQ_HOSTS`."""
    # The API's client: it fails over between the nodes, declaring the RPC exchange as
    # the API does (so either may start first) and nothing of the events side.
    rabbit = RabbitClient(settings, name=f"rpc-echo:{service}", declare=declare_rpc_exchange)
    await rabbit.start()

    async def consume() -> None:
        connection = await rabbit.wait_connected()
        channel = await connection.channel()
        try:
            await channel.set_qos(prefetch_count=PREFETCH)
            exchange = await channel.get_exchange(settings.RMQ_RPC_EXCHANGE, ensure=False)
            queue = await channel.declare_queue(
                f"{settings.RMQ_RPC_EXCHANGE}.{service}", auto_delete=True
            )
            await queue.bind(exchange, routing_key=service)

            async def on_request(message: AbstractIncomingMessage) -> None:
                await answer(channel, service, message)

            await queue.consume(on_request)
        except BaseException:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(channel.close(), CLOSE_TIMEOUT)
            raise
        logger.info("rpc echo ready", extra={"service": service, "queue": queue.name})
        if ready is not None:
            ready.set()
        await until_closed(stop, channel, connection)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(channel.close(), CLOSE_TIMEOUT)

    try:
        await reconnect_forever(consume, name="rpc echo", logger=logger, stop=stop)
    finally:
        await rabbit.close()
    logger.info("rpc echo stopped", extra={"service": service})


async def _run(service: str) -> None:
    settings = load_settings()
    configure_logging(settings.LOGLEVEL)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    await serve(settings, service, stop=stop)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m api.rpc_echo",
        description="Answer redirect-gateway requests for SERVICE by echoing them back.",
    )
    parser.add_argument("service", metavar="SERVICE", help="routing key = the gateway's {service}")
    args = parser.parse_args(argv)
    asyncio.run(_run(args.service))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
