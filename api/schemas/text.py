"""String constraints shared by request bodies."""

from __future__ import annotations

# PostgreSQL text and JSONB cannot hold U+0000: refused at the edge, it is a 422, not a 500.
WITHOUT_NUL = r"^[^\x00]*$"
