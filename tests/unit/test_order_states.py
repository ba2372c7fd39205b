"""The order state machine of SPEC §4: `pending → paid → shipped → delivered`,
`pending|paid → cancelled`, nothing else."""

from __future__ import annotations

import itertools

import pytest

from api.helpers.enums import ORDER_TRANSITIONS, OrderStatus, can_transition

S = OrderStatus
# Written out from the contract, not derived from the code under test.
ALLOWED = {
    (S.PENDING, S.PAID),
    (S.PAID, S.SHIPPED),
    (S.SHIPPED, S.DELIVERED),
    (S.PENDING, S.CANCELLED),
    (S.PAID, S.CANCELLED),
}
EVERY_MOVE = list(itertools.product(OrderStatus, repeat=2))


def test_the_statuses_are_the_contracts() -> None:
    assert {status.value for status in OrderStatus} == {
        "pending",
        "paid",
        "shipped",
        "delivered",
        "cancelled",
    }
    assert set(ORDER_TRANSITIONS) == set(OrderStatus)


@pytest.mark.parametrize(("current", "target"), EVERY_MOVE)
def test_a_move_is_allowed_exactly_when_the_contract_lists_it(
    current: OrderStatus, target: OrderStatus
) -> None:
    assert can_transition(current, target) is ((current, target) in ALLOWED)


def test_delivered_and_cancelled_are_final_and_nothing_moves_to_itself() -> None:
    assert ORDER_TRANSITIONS[S.DELIVERED] == frozenset()
    assert ORDER_TRANSITIONS[S.CANCELLED] == frozenset()
    assert not any(can_transition(status, status) for status in OrderStatus)


def test_nothing_leads_back_to_pending() -> None:
    # SPEC §4: a PATCH to `pending` is a 409 from every status.
    assert not any(can_transition(status, S.PENDING) for status in OrderStatus)
