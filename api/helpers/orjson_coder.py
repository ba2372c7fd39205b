"""orjson encoding shared by HTTP responses and the Redis cache."""

from __future__ import annotations

from typing import Any

import orjson
from fastapi.responses import JSONResponse

_OPTIONS = orjson.OPT_UTC_Z | orjson.OPT_NON_STR_KEYS


def dumps(value: Any) -> bytes:
    return orjson.dumps(value, option=_OPTIONS)


def loads(data: bytes | bytearray | memoryview | str) -> Any:
    return orjson.loads(data)


class ORJSONResponse(JSONResponse):
    """JSON response rendered by orjson (UTC datetimes as `Z`)."""

    def render(self, content: Any) -> bytes:
        return dumps(content)
