"""The state table is the only authority on legal changes."""

from __future__ import annotations

import pytest

from producer.errors import IllegalTransition
from producer.states import RETRYABLE, TERMINAL, TRANSITIONS, State, check_transition


def test_every_state_has_a_row_in_the_table() -> None:
    assert set(TRANSITIONS) == {None, *State}


def test_a_command_starts_pending_or_rejected() -> None:
    assert TRANSITIONS[None] == {State.PENDING, State.REJECTED}


@pytest.mark.parametrize(
    ("src", "dst"),
    [
        (State.SUCCEEDED, State.RUNNING),
        (State.REJECTED, State.PENDING),
        (State.PENDING, State.SUCCEEDED),
        (State.REVOKED, State.RUNNING),
        (None, State.RUNNING),
    ],
)
def test_illegal_changes_are_refused(src: State | None, dst: State) -> None:
    with pytest.raises(IllegalTransition):
        check_transition(src, dst)


def test_rejected_is_final_and_retry_covers_failed_revoked_reverted() -> None:
    assert TRANSITIONS[State.REJECTED] == frozenset()
    assert {State.FAILED, State.REVOKED, State.REVERTED} == RETRYABLE
    assert State.RUNNING not in TERMINAL and State.PENDING not in TERMINAL
