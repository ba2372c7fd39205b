"""ORM models; importing this package registers every table on `Base.metadata`."""

from api.models.base import Base
from api.models.order import IdempotencyKey, Order
from api.models.outbox import HousekeepingLease, OutboxEvent, ProcessedMessage
from api.models.user import RefreshToken, User

__all__ = [
    "Base",
    "HousekeepingLease",
    "IdempotencyKey",
    "Order",
    "OutboxEvent",
    "ProcessedMessage",
    "RefreshToken",
    "User",
]
