"""What every kind of the soak's submissions must have become once nothing moves any more,
read from the store in two queries (not one get() per command: a 30-minute run has 180,000)."""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa

from chaos.stack import TENANT

# kind -> the one outcome that is right for it, as `_outcome` spells it
EXPECTED: dict[str, str] = {
    "ok": "succeeded",
    "action": "succeeded",
    "rollback": "reverted/exit_code",
    "rollback_action": "reverted/exit_code",
    "timeout": "failed/timeout",
    "revoke": "revoked",
    "saga_ok": "batch succeeded: succeeded,succeeded,succeeded",
    "saga_fail": "batch reverted: reverted,reverted,failed/exit_code",
}


@dataclass
class Outcomes:
    """Per kind: how many were accepted and what they became; `problems` names the rest."""

    by_kind: dict[str, dict[str, int]] = field(default_factory=dict)
    commands: int = 0  # command rows of the tenant (a saga has three)
    unsettled: int = 0
    unexpected: int = 0
    problems: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _outcome(row: Any) -> str:
    """`state`, or `state/failure_reason` where the reason tells kinds apart; a rolled-back
    command also says whether its compensation succeeded."""
    if row.state in ("succeeded", "revoked", "pending", "running", "reverting"):
        return str(row.state)
    # a saga's succeeded steps are reverted without a failure reason of their own
    text = str(row.state) if row.failure_reason is None else f"{row.state}/{row.failure_reason}"
    comp = row.compensation or {}
    if row.state == "reverted" and comp.get("state") != "reverted":
        text += f" (compensation {comp.get('state')}/{comp.get('failure_reason')})"
    return text


def check_outcomes(engine: sa.Engine, sent: Iterable[tuple[str, str]]) -> Outcomes:
    """Each accepted submission against EXPECTED."""
    commands = sa.text(
        "SELECT id, state, failure_reason, compensation, batch_id, batch_step "
        "FROM commands WHERE tenant = :t"
    )
    batches = sa.text("SELECT id, state FROM batches WHERE tenant = :t")
    with engine.connect() as conn:
        rows = list(conn.execute(commands, {"t": TENANT}))
        batch_state = {b.id: b.state for b in conn.execute(batches, {"t": TENANT})}
    single = {r.id: r for r in rows if r.batch_id is None}
    steps: dict[str, list[Any]] = defaultdict(list)
    for r in rows:
        if r.batch_id is not None:
            steps[r.batch_id].append(r)
    out = Outcomes(commands=len(rows))
    out.unsettled = sum(r.state in ("pending", "running", "reverting") for r in rows)
    seen: dict[str, Counter[str]] = defaultdict(Counter)
    for kind, id_ in sent:
        if kind.startswith("saga"):
            parts = sorted(steps.get(id_, []), key=lambda r: r.batch_step)
            got = f"batch {batch_state.get(id_, 'missing')}: " + ",".join(map(_outcome, parts))
        else:
            row = single.get(id_)
            got = "missing" if row is None else _outcome(row)
        seen[kind][got] += 1
        if got != EXPECTED[kind]:
            out.unexpected += 1
            if len(out.problems) < 20:
                out.problems.append(f"{kind} {id_}: {got}, expected {EXPECTED[kind]}")
    out.by_kind = {k: dict(v) for k, v in sorted(seen.items())}
    if out.unexpected > len(out.problems):
        out.problems.append(f"... {out.unexpected} unexpected outcome(s) in all")
    return out


def wait_batches(engine: sa.Engine, deadline: float) -> int:
    """A saga moves on after its last step settles: wait for the batches too."""
    query = sa.text("SELECT count(*) FROM batches WHERE state IN ('running', 'reverting')")
    left = -1
    while time.monotonic() < deadline:
        with engine.connect() as conn:
            left = int(conn.execute(query).scalar_one())
        if left == 0:
            return 0
        time.sleep(0.5)
    return left
