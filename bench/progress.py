"""Progress lines on stderr, stamped with the seconds since the run started."""

from __future__ import annotations

import sys
import time

_STARTED = time.monotonic()


def log(message: str) -> None:
    """One progress line; stdout stays for the results table."""
    sys.stderr.write(f"[bench {time.monotonic() - _STARTED:6.1f}s] {message}\n")
    sys.stderr.flush()
