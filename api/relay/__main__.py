"""Run the outbox relay on its own: `python -m api.relay` (SIGTERM/SIGINT stop it cleanly)."""

from __future__ import annotations

import asyncio
import logging
import signal

from api.configs import Settings, load_settings
from api.database.connection import create_engine, create_sessionmaker
from api.helpers.logger import configure_logging
from api.rabbit_core.client import RabbitClient
from api.relay.outbox_relay import OutboxRelay
from api.tracing import setup_tracing, shutdown_tracing

logger = logging.getLogger("api.relay")


async def run_relay(settings: Settings) -> None:
    """Relay until SIGTERM or SIGINT, then finish the batch in hand and close everything."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    engine = create_engine(settings)
    rabbit = RabbitClient(settings)
    await rabbit.start()
    relay = OutboxRelay(settings, create_sessionmaker(engine), rabbit)
    await relay.start()
    logger.info("outbox relay started")
    try:
        await stop.wait()
    finally:
        await relay.stop()
        await rabbit.close()
        await engine.dispose()
        shutdown_tracing()
        logger.info("outbox relay stopped")


def main() -> None:
    settings = load_settings()
    configure_logging(settings.LOGLEVEL)
    setup_tracing()
    try:
        import uvloop
    except ImportError:  # uvloop is optional (not on Windows)
        asyncio.run(run_relay(settings))
    else:
        uvloop.run(run_relay(settings))


if __name__ == "__main__":
    main()
