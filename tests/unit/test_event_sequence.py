"""The CloudEvents `sequence` of an order's events sorts as its versions do."""

from __future__ import annotations

from api.events import event_sequence


def test_sequence_strings_sort_in_version_order() -> None:
    # The CloudEvents sequence extension compares strings; unpadded, "10" < "9".
    versions = [1, 2, 9, 10, 11, 99, 100, 12345, 10**19]
    assert sorted(map(event_sequence, versions)) == [event_sequence(v) for v in versions]
    assert event_sequence(3) == "00000000000000000003"
