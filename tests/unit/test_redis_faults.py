"""What counts as a Redis outage (circuit open, memory buckets) and what is a fault to report."""

from __future__ import annotations

import pytest
from redis.exceptions import (
    AuthenticationError,
    ClusterDownError,
    MovedError,
    NoPermissionError,
    ReadOnlyError,
    ResponseError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from api.redis_core.circuit import fault_kind


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (RedisConnectionError("Connection refused"), None),
        (RedisTimeoutError("Timeout reading"), None),
        (TimeoutError(), None),
        (ClusterDownError("CLUSTERDOWN The cluster is down"), None),
        (
            ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value"),
            "WRONGTYPE",
        ),
        (ResponseError("CROSSSLOT Keys in request don't hash to the same slot"), "CROSSSLOT"),
        (
            NoPermissionError("NOPERM this user has no permissions to run the 'evalsha' command"),
            "NOPERM",
        ),
        (ReadOnlyError("READONLY You can't write against a read only replica."), "READONLY"),
        (MovedError("3999 127.0.0.1:6381"), "MOVED"),
        (AuthenticationError("invalid username-password pair"), "AUTH"),
    ],
)
def test_only_an_outage_is_an_outage(error: Exception, kind: str | None) -> None:
    assert fault_kind(error) == kind
