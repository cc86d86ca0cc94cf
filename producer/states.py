"""Command states and the one table that says which changes are legal."""

from __future__ import annotations

from enum import StrEnum

from producer.errors import IllegalTransition


class State(StrEnum):
    """Where a command is in its life; stored as its string value."""

    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    REJECTED = "rejected"
    REVOKED = "revoked"
    REVERTING = "reverting"
    REVERTED = "reverted"
    REVERT_FAILED = "revert_failed"


# from-state -> the states it may move to. `None` is "no row yet" (the first transition).
TRANSITIONS: dict[State | None, frozenset[State]] = {
    None: frozenset({State.PENDING, State.REJECTED}),
    State.PENDING: frozenset({State.RUNNING, State.REVOKED, State.FAILED}),
    # RUNNING -> PENDING is the re-run of a retry-safe command whose worker was lost.
    State.RUNNING: frozenset({State.SUCCEEDED, State.FAILED, State.REVOKED, State.PENDING}),
    State.SUCCEEDED: frozenset({State.REVERTING}),
    State.FAILED: frozenset({State.PENDING, State.REVERTING}),
    State.REVOKED: frozenset({State.PENDING}),
    State.REVERTING: frozenset({State.REVERTED, State.REVERT_FAILED}),
    State.REVERTED: frozenset({State.PENDING}),
    State.REVERT_FAILED: frozenset({State.REVERTING, State.REVERTED, State.FAILED}),
    State.REJECTED: frozenset(),
}

TERMINAL: frozenset[State] = frozenset(
    {
        State.SUCCEEDED,
        State.FAILED,
        State.REJECTED,
        State.REVOKED,
        State.REVERTED,
        State.REVERT_FAILED,
    }
)

# What an operator may retry. RUNNING -> PENDING exists too, but only the reaper takes it.
RETRYABLE: frozenset[State] = frozenset({State.FAILED, State.REVOKED, State.REVERTED})


# What an operator may roll back: a compensation undoes what ran (or half ran); a failed
# compensation (revert_failed) is tried again the same way.
ROLLBACKABLE: frozenset[State] = frozenset({State.SUCCEEDED, State.FAILED, State.REVERT_FAILED})

# `execq override`: a person settles a command by hand. Without --force only a failed
# compensation may be settled; with --force (and a second person's approval) also these.
OVERRIDE_TO: frozenset[State] = frozenset({State.REVERTED, State.FAILED})
FORCE_OVERRIDE_FROM: frozenset[State] = frozenset(
    {State.REVERT_FAILED, State.REVERTING, State.SUCCEEDED, State.FAILED, State.REVOKED}
)


def can_transition(src: State | None, dst: State, *, override: bool = False) -> bool:
    """Whether the table allows `src -> dst` (or a forced override does)."""
    if override:
        return src in FORCE_OVERRIDE_FROM and dst in OVERRIDE_TO and src is not dst
    return dst in TRANSITIONS[src]


def check_transition(src: State | None, dst: State, *, override: bool = False) -> None:
    """Raise IllegalTransition unless the table allows `src -> dst`."""
    if not can_transition(src, dst, override=override):
        raise IllegalTransition(f"a command cannot go from {src or 'nothing'} to {dst}")


def is_terminal(state: State) -> bool:
    """Whether a waiter can stop waiting: nothing will change without an operator."""
    return state in TERMINAL
