"""Request ids: which ones a caller may hand us, and new ones.

An HTTP request keeps its `X-Request-ID`, a status message its correlation id, when
it passes `valid_request_id`; otherwise it gets `new_request_id()`. The id is logged
and put on responses and events, so it is bounded and free of separators.
"""

from __future__ import annotations

import re
from random import getrandbits

REQUEST_ID_PATTERN = re.compile(r"[A-Za-z0-9._:-]{1,128}")

# The version (4) and variant (RFC 9562) bits of a random UUID.
_UUID4_CLEAR = ~((0xC000 << 48) | (0xF000 << 64)) & ((1 << 128) - 1)
_UUID4_SET = (0x8000 << 48) | (4 << 76)


def valid_request_id(candidate: str) -> bool:
    """1-128 letters, digits and `._:-`: safe to log and to echo in a header."""
    return REQUEST_ID_PATTERN.fullmatch(candidate) is not None


def new_request_id() -> str:
    """A random (version 4) UUID as text, a third of `str(uuid.uuid4())`'s cost.

    A request id must be unique, not unguessable, so it comes from the process's
    Mersenne Twister (seeded from the OS, again after a fork) instead of a system call.
    """
    digits = "%032x" % (getrandbits(128) & _UUID4_CLEAR | _UUID4_SET)
    return f"{digits[:8]}-{digits[8:12]}-{digits[12:16]}-{digits[16:20]}-{digits[20:]}"
