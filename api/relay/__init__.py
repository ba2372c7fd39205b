"""The transactional outbox relay; `python -m api.relay` runs it on its own."""

from api.relay.outbox_relay import OutboxRelay

__all__ = ["OutboxRelay"]
