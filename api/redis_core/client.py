"""One kept redis-py asyncio client per process, for the configured topology (SPEC §12).

`standalone` is a `Redis` on REDIS_HOST:REDIS_PORT; `sentinel` a `Redis` whose pool
asks the sentinels of REDIS_NODES for the current primary of REDIS_SENTINEL_MASTER
(and drops its connections when the primary changes); `cluster` a `RedisCluster`
seeded with REDIS_NODES, which follows MOVED/ASK and refreshes its slot map after a
failover. REDIS_TLS applies to every connection, sentinels included. Nothing here
connects: a down Redis fails a call fast instead of hanging it.
"""

from __future__ import annotations

from typing import Any

from redis.asyncio import Redis, RedisCluster, Sentinel
from redis.asyncio.cluster import ClusterNode
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from api.configs import RedisMode, Settings

RedisClient = Redis | RedisCluster


def _credentials(settings: Settings) -> dict[str, Any]:
    if settings.REDIS_USER:
        return {
            "username": settings.REDIS_USER,
            "password": settings.REDIS_USER_PASSWORD.get_secret_value() or None,
        }
    return {"username": None, "password": settings.REDIS_PASSWORD.get_secret_value() or None}


def _tls(settings: Settings) -> dict[str, Any]:
    if not settings.REDIS_TLS:
        return {}
    return {
        "ssl": True,
        "ssl_ca_certs": settings.REDIS_TLS_CA_FILE or None,
        "ssl_certfile": settings.REDIS_TLS_CERT_FILE or None,
        "ssl_keyfile": settings.REDIS_TLS_KEY_FILE or None,
        "ssl_cert_reqs": "required",
    }


def _common(settings: Settings) -> dict[str, Any]:
    return {
        **_credentials(settings),
        **_tls(settings),
        # No per-read timeout: every call of the service goes through `AutoPipeline`,
        # which bounds each whole pipeline by REDIS_SOCKET_TIMEOUT (one timer per batch
        # instead of one per reply: a tenth of a call's CPU). A cancelled read closes
        # its connection.
        "socket_timeout": None,
        "socket_connect_timeout": settings.REDIS_SOCKET_TIMEOUT,
        "health_check_interval": 30,
        "client_name": "orders-api",
    }


def create_redis(settings: Settings) -> RedisClient:
    """The client of REDIS_MODE; lazily connecting, with short timeouts."""
    common = _common(settings)
    # One immediate retry on a broken connection only: a pooled connection that died
    # with a Redis restart reconnects instead of failing a request. A timeout (a hung
    # Redis) is not retried, so no call waits longer than one socket timeout.
    retry = Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,))
    if settings.REDIS_MODE is RedisMode.CLUSTER:
        return RedisCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in settings.redis_nodes],
            retry=Retry(NoBackoff(), 1),
            max_connections=64,
            **common,
        )
    if settings.REDIS_MODE is RedisMode.SENTINEL:
        sentinel = Sentinel(  # type: ignore[no-untyped-call]
            settings.redis_nodes,
            # The sentinels speak TLS like the data nodes; they take no data credentials.
            sentinel_kwargs={
                **_tls(settings),
                "socket_timeout": settings.REDIS_SOCKET_TIMEOUT,
                "socket_connect_timeout": settings.REDIS_SOCKET_TIMEOUT,
            },
            **common,
        )
        primary: Redis = sentinel.master_for(
            settings.REDIS_SENTINEL_MASTER,
            db=settings.REDIS_DB,
            retry=retry,
            max_connections=64,
            check_connection=False,
        )
        return primary
    return Redis(
        host=settings.REDIS_HOST,
        port=settings.REDIS_PORT,
        db=settings.REDIS_DB,
        max_connections=64,
        retry=retry,
        **common,
    )


async def close_redis(client: RedisClient) -> None:
    """Close the client's connections, and under Sentinel the connections to the sentinels."""
    await client.aclose()
    manager = (
        getattr(client.connection_pool, "sentinel_manager", None)
        if isinstance(client, Redis)
        else None
    )
    if manager is not None:
        for sentinel in manager.sentinels:
            await sentinel.aclose()
