"""Where every Redis key lives: under REDIS_KEY_PREFIX, in the hash slot of one `{tag}`.

Redis Cluster hashes only the part of a key between the first `{` and the next `}`,
so every key that one script or command touches carries the same tag (SPEC §12):

| key (`<p>` = prefix)           | tag        | touched by                                   |
|--------------------------------|------------|----------------------------------------------|
| `<p>{user:<id>}:rl:<policy>`   | identity   | the token-bucket script                      |
| `<p>{ip:<addr>}:rl:<policy>`   | identity   | the token-bucket script                      |
| `<p>{user:<id>}:gen`           | viewer     | the script (read); a bump per write          |
| `<p>{user:<id>}:cache:<res>`   | viewer     | the script (read); one SET per fill          |
| `<p>{order:<id>}:gen`          | order      | a GET on an admin's read; a bump per write   |
| `<p>{admins}:gen`              | admins     | a GET on an admin's list; a bump per write   |
| `<p>{ready}:rl:probe`          | readiness  | the token-bucket script at cost 0            |

A viewer's bucket, generation and entries share the viewer's slot, so a cached read
by its owner is one script call. An admin's entry depends on a counter of another
slot (the order's, or the admins' for lists), read by a second single-key call.
"""

from __future__ import annotations

import uuid

READINESS_IDENTITY = "ready"


def _check_prefix(prefix: str) -> str:
    if "{" in prefix or "}" in prefix:
        # A brace in the prefix would become the hash tag of every key: one slot for all.
        raise ValueError("REDIS_KEY_PREFIX must not contain '{' or '}'")
    return prefix


class RedisKeys:
    """The key layout above for one REDIS_KEY_PREFIX."""

    __slots__ = ("prefix",)

    def __init__(self, prefix: str) -> None:
        self.prefix = _check_prefix(prefix)

    def bucket(self, policy: str, identity: str) -> str:
        """The token bucket of (`policy`, `identity`); identity is `user:<id>` or `ip:<addr>`."""
        return f"{self.prefix}{{{identity}}}:rl:{policy}"

    def viewer_generation(self, viewer_id: uuid.UUID) -> str:
        return f"{self.prefix}{{user:{viewer_id}}}:gen"

    def entry(self, viewer_id: uuid.UUID, resource: str) -> str:
        return f"{self.prefix}{{user:{viewer_id}}}:cache:{resource}"

    def order_generation(self, order_id: uuid.UUID) -> str:
        return f"{self.prefix}{{order:{order_id}}}:gen"

    def admins_generation(self) -> str:
        return f"{self.prefix}{{admins}}:gen"
