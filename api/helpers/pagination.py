"""Opaque keyset cursors: a position `(created_at, id)` in 38 URL-safe characters."""

from __future__ import annotations

import base64
import hashlib
import re
import struct
import uuid
from datetime import UTC, datetime, timedelta

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)
# Microseconds since the epoch (PostgreSQL's timestamp resolution, so exact) + the UUID bytes.
_POSITION = struct.Struct(">q16s")
# A short checksum turns a garbled or truncated cursor into an error instead of a silent
# jump to some other position. It is not a secret: a forged position still only reaches
# orders the caller may see.
_CHECKSUM_BYTES = 4
_CURSOR_RE = re.compile(r"^[A-Za-z0-9_-]{38}$")


class InvalidCursor(ValueError):
    """The cursor was not produced by `encode_cursor`."""


def _checksum(position: bytes) -> bytes:
    return hashlib.blake2b(position, digest_size=_CHECKSUM_BYTES).digest()


def _encode(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def encode_cursor(created_at: datetime, order_id: uuid.UUID) -> str:
    position = _POSITION.pack((created_at - _EPOCH) // _MICROSECOND, order_id.bytes)
    return _encode(position + _checksum(position))


def decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    """The position a cursor stands for; `InvalidCursor` for anything else."""
    if not _CURSOR_RE.match(cursor):
        raise InvalidCursor("not a cursor returned by this API")
    raw = base64.urlsafe_b64decode(cursor + "==")
    position, checksum = raw[: _POSITION.size], raw[_POSITION.size :]
    # The re-encoding check refuses variants that differ only in the last character's unused bits.
    if checksum != _checksum(position) or _encode(raw) != cursor:
        raise InvalidCursor("not a cursor returned by this API")
    micros, id_bytes = _POSITION.unpack(position)
    try:
        created_at = _EPOCH + micros * _MICROSECOND
    except OverflowError:
        raise InvalidCursor("not a cursor returned by this API") from None
    return created_at, uuid.UUID(bytes=id_bytes)
