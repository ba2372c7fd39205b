"""Order entity tags and the `If-Match` / `If-None-Match` header lists (RFC 9110 §8.8.3, §13.1)."""

from __future__ import annotations

import re
import uuid

# Strong and deterministic: the same order version has the same tag in every process.
_ORDER_ETAG_RE = re.compile(r'^"(\d{1,10})-([0-9a-f]{32})"$')
_ENTITY_TAG_RE = re.compile(r'(?:W/)?"[\x21\x23-\x7e\x80-\xff]*"')


def order_etag(order_id: uuid.UUID, version: int) -> str:
    """The quoted strong entity tag of one version of an order."""
    return f'"{version}-{order_id.hex}"'


def _entity_tags(header: str) -> list[str] | None:
    """The listed entity tags, or None for the wildcard `*`."""
    if header.strip() == "*":
        return None
    return _ENTITY_TAG_RE.findall(header)


def none_match(header: str, etag: str) -> bool:
    """Whether `If-None-Match: header` matches `etag` (weak comparison, as RFC 9110 asks)."""
    tags = _entity_tags(header)
    return tags is None or any(tag.removeprefix("W/") == etag for tag in tags)


def if_match_versions(header: str, order_id: uuid.UUID) -> frozenset[int] | None:
    """The versions of `order_id` that `If-Match: header` accepts, or None for `*` (any).

    Strong comparison: weak tags and tags of other orders accept nothing.
    """
    tags = _entity_tags(header)
    if tags is None:
        return None
    versions = set()
    for tag in tags:
        match = _ORDER_ETAG_RE.match(tag)
        if match is not None and match[2] == order_id.hex:
            versions.add(int(match[1]))
    return frozenset(versions)
