"""Order entity tags and the `If-Match` / `If-None-Match` lists (SPEC §4, §7; RFC 9110 §8.8.3)."""

from __future__ import annotations

import uuid

import pytest

from api.helpers.etags import if_match_versions, none_match, order_etag

ORDER = uuid.UUID("0b4f6a8e-3c1d-4e2f-9a7b-5c6d7e8f9012")
OTHER = uuid.UUID("f0e1d2c3-b4a5-4968-8776-655443322110")
TAG_V3 = '"3-0b4f6a8e3c1d4e2f9a7b5c6d7e8f9012"'


def test_the_tag_is_quoted_strong_and_a_function_of_id_and_version_only() -> None:
    # A literal: the same in every process and after a restart (no `hash()`, no salt).
    assert order_etag(ORDER, 3) == TAG_V3
    assert order_etag(ORDER, 4) != TAG_V3
    assert order_etag(OTHER, 3) != TAG_V3


@pytest.mark.parametrize(
    "header",
    [
        TAG_V3,
        f"W/{TAG_V3}",  # weak comparison: a weak form of the tag matches
        f'"other", {TAG_V3}',
        f'{TAG_V3},"1-{ORDER.hex}"',
        "*",
        "  *  ",
    ],
)
def test_if_none_match_matches_the_current_tag_in_any_list_or_the_wildcard(header: str) -> None:
    assert none_match(header, TAG_V3)


@pytest.mark.parametrize(
    "header",
    [
        "",
        order_etag(ORDER, 2),
        order_etag(OTHER, 3),
        TAG_V3.strip('"'),  # unquoted: not an entity tag
        f'"*", "4-{ORDER.hex}"',  # a quoted star is a tag, not the wildcard
        "garbage",
    ],
)
def test_if_none_match_does_not_match_other_tags_or_garbage(header: str) -> None:
    assert not none_match(header, TAG_V3)


def test_if_match_wildcard_accepts_any_version() -> None:
    assert if_match_versions("*", ORDER) is None


@pytest.mark.parametrize(
    ("header", "versions"),
    [
        (TAG_V3, {3}),
        (f"{order_etag(ORDER, 1)}, {TAG_V3}", {1, 3}),
        (f"W/{TAG_V3}", set()),  # strong comparison: a weak tag accepts nothing
        (order_etag(OTHER, 3), set()),  # another order's tag
        (f'"3-{ORDER.hex.upper()}"', set()),
        (f'"12345678901-{ORDER.hex}"', set()),  # more than ten digits: not one of ours
        ('"-1"', set()),
        ("garbage", set()),
        ("", set()),
    ],
)
def test_if_match_accepts_only_strong_tags_of_this_order(header: str, versions: set[int]) -> None:
    assert if_match_versions(header, ORDER) == versions
