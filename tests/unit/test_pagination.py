"""Keyset cursors: opaque, URL-safe, exact, and refused when garbled (SPEC §4)."""

from __future__ import annotations

import base64
import hashlib
import string
import struct
import uuid
from datetime import UTC, datetime, timedelta, timezone

import pytest

from api.helpers.pagination import InvalidCursor, decode_cursor, encode_cursor

ORDER = uuid.UUID("0b4f6a8e-3c1d-4e2f-9a7b-5c6d7e8f9012")
URL_SAFE = set(string.ascii_letters + string.digits + "-_")
CURSOR = encode_cursor(datetime(2025, 3, 1, 12, 30, tzinfo=UTC), ORDER)


@pytest.mark.parametrize(
    "created_at",
    [
        datetime(2025, 3, 1, 12, 30, 45, 123456, tzinfo=UTC),
        datetime(1970, 1, 1, tzinfo=UTC),
        datetime(1969, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
        datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
        datetime(1, 1, 1, tzinfo=UTC),
    ],
)
def test_a_cursor_decodes_to_exactly_its_position(created_at: datetime) -> None:
    cursor = encode_cursor(created_at, ORDER)
    assert len(cursor) == 38
    assert set(cursor) <= URL_SAFE
    assert decode_cursor(cursor) == (created_at, ORDER)


def test_the_position_is_an_instant_whatever_the_offset_it_was_given_in() -> None:
    instant = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
    local = instant.astimezone(timezone(timedelta(hours=2)))
    assert encode_cursor(local, ORDER) == encode_cursor(instant, ORDER)
    decoded, _ = decode_cursor(encode_cursor(local, ORDER))
    assert decoded == instant
    assert decoded.utcoffset() == timedelta(0)


def test_neighbouring_positions_have_different_cursors() -> None:
    at = datetime(2025, 3, 1, tzinfo=UTC)
    cursors = {
        encode_cursor(at, ORDER),
        encode_cursor(at + timedelta(microseconds=1), ORDER),
        encode_cursor(at, uuid.UUID(int=ORDER.int + 1)),
    }
    assert len(cursors) == 3


def test_every_single_character_change_is_refused() -> None:
    accepted = []
    for index, original in enumerate(CURSOR):
        for replacement in sorted(URL_SAFE - {original}):
            garbled = CURSOR[:index] + replacement + CURSOR[index + 1 :]
            try:
                decode_cursor(garbled)
            except InvalidCursor:
                continue
            accepted.append(garbled)
    assert accepted == []


@pytest.mark.parametrize(
    "garbled",
    [
        CURSOR[:-1],
        CURSOR + "A",
        CURSOR + "==",
        "+" + CURSOR[1:],  # standard base64, not the URL-safe alphabet
        "/" + CURSOR[1:],
        " " + CURSOR[1:],
        CURSOR[:10] + "\u00e9" + CURSOR[11:],
        "",
    ],
)
def test_a_cursor_of_the_wrong_shape_is_refused(garbled: str) -> None:
    with pytest.raises(InvalidCursor):
        decode_cursor(garbled)


def test_a_well_formed_position_beyond_any_datetime_is_refused() -> None:
    # The layout (big-endian microseconds since the epoch, the UUID's bytes, a 4-byte
    # BLAKE2b checksum) written out here, so only the out-of-range time is wrong.
    position = struct.pack(">q16s", 2**62, ORDER.bytes)
    raw = position + hashlib.blake2b(position, digest_size=4).digest()
    cursor = base64.urlsafe_b64encode(raw).decode().rstrip("=")
    with pytest.raises(InvalidCursor):
        decode_cursor(cursor)


def test_invalid_cursor_is_a_value_error() -> None:
    # Callers that catch ValueError for bad input catch a bad cursor too.
    assert issubclass(InvalidCursor, ValueError)
