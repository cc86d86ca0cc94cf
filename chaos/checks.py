"""What must hold once a scenario's faults are over: nothing lost, nothing run twice that may
not be, `worker_lost` only where a worker really died, audit chains intact, nothing leaked."""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil
import sqlalchemy as sa

from chaos.load import Accepted
from chaos.servers import RedisServer
from chaos.stack import TENANT, Stack
from producer.states import TERMINAL
from workers.sandbox import detect_capabilities

UNSETTLED = ("pending", "running", "reverting")
# lease_owner is "<tenant>@<host>:<pid of the pool process>"; the reaper leaves it on the row
OWNER_PID = re.compile(r":(\d+)$")
CGROUP_PID = re.compile(r"^execq-(?:probe-)?(\d+)")


@dataclass
class Faults:
    """What a scenario did: the pids it killed (pool and main) and when its faults ended."""

    killed_pids: set[int] = field(default_factory=set)
    # marker labels of commands whose shell was SIGKILLed: they may fail with `signal`
    killed_labels: set[str] = field(default_factory=set)
    events: list[str] = field(default_factory=list)
    # what the injector itself found wrong (a client's view, say): the report's problems too
    problems: list[str] = field(default_factory=list)
    end: float | None = None  # time.time() when the last fault was over

    def note(self, what: str) -> None:
        self.events.append(f"{time.strftime('%H:%M:%S')} {what}")


@dataclass
class Report:
    """One scenario's outcome; `problems` empty means every check passed."""

    scenario: str
    accepted: int = 0
    completed: int = 0
    worker_lost: int = 0
    killed: int = 0  # commands whose shell the scenario killed (failed with `signal`)
    no_secrets: int = 0  # commands with the canary whose message was lost (see load.Accepted)
    failed_other: int = 0
    lost: int = 0
    duplicated: int = 0
    leaked: int = 0
    recover_s: float | None = None
    duration_s: float = 0.0
    submit_errors: dict[str, int] = field(default_factory=dict)
    faults: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "passed": self.passed}


def unsettled(engine: sa.Engine) -> int:
    """Commands not yet in a state that stays (pending, running, reverting)."""
    query = sa.text("SELECT count(*) FROM commands WHERE state IN :s").bindparams(
        sa.bindparam("s", expanding=True)
    )
    with engine.connect() as conn:
        return int(conn.execute(query, {"s": list(UNSETTLED)}).scalar_one())


def wait_settled(engine: sa.Engine, deadline: float) -> int:
    """Poll until nothing is unsettled or the deadline; the count still unsettled. A store
    that is unreachable for a moment is polled again, as a client would."""
    left = -1
    while time.monotonic() < deadline:
        with contextlib.suppress(sa.exc.OperationalError):
            left = unsettled(engine)
            if left == 0:
                return 0
        time.sleep(0.25)
    return left


def _rows(engine: sa.Engine) -> dict[str, Any]:
    query = sa.text(
        "SELECT id, state, failure_reason, retry_safe, attempts, lease_owner, finished_at "
        "FROM commands WHERE tenant = :t"
    )
    with engine.connect() as conn:
        return {row.id: row for row in conn.execute(query, {"t": TENANT})}


def _markers(markers: Path) -> Counter[str]:
    return Counter({p.name: len(p.read_text().splitlines()) for p in markers.iterdir()})


def check_commands(
    report: Report, engine: sa.Engine, accepted: list[Accepted], markers: Path, faults: Faults
) -> None:
    """Lost, duplicated, unexplained worker_lost, and the time to recover."""
    rows = _rows(engine)
    runs = _markers(markers)
    report.accepted = len(accepted)
    terminal = {s.value for s in TERMINAL}
    reasons: Counter[str] = Counter()
    last_finish: datetime | None = None
    for a in accepted:
        row = rows.get(a.id)
        n = runs.get(a.label, 0)
        if row is None or row.state not in terminal:
            report.lost += 1
            state = "missing from the store" if row is None else row.state
            report.problems.append(f"lost: {a.id} ({a.label}) is {state}")
            continue
        # the commands the fault could touch: accepted before it was over
        affected = faults.end is None or a.accepted_at <= faults.end
        if (
            affected
            and row.finished_at is not None
            and (last_finish is None or row.finished_at > last_finish)
        ):
            last_finish = row.finished_at
        if row.state == "succeeded":
            report.completed += 1
            if n == 0:
                report.lost += 1
                report.problems.append(f"lost: {a.id} ({a.label}) succeeded but never ran")
        elif row.state == "failed" and row.failure_reason == "worker_lost":
            report.worker_lost += 1
            match = OWNER_PID.search(row.lease_owner or "")
            if match is None or int(match.group(1)) not in faults.killed_pids:
                report.problems.append(
                    f"worker_lost on a live worker: {a.id} (lease owner {row.lease_owner}, "
                    f"killed pids {sorted(faults.killed_pids)}, ran {n} time(s))"
                )
        elif row.failure_reason == "signal" and a.label in faults.killed_labels:
            report.killed += 1
        elif row.failure_reason == "secrets_unavailable" and a.secret:
            # its message was lost and re-published from the store, which never holds secrets
            report.no_secrets += 1
        else:
            report.failed_other += 1
            reasons[f"{row.state}/{row.failure_reason}"] += 1
        limit = row.attempts if a.retry_safe else 1
        if n > limit:
            report.duplicated += 1
            report.problems.append(
                f"duplicated: {a.id} ({a.label}, retry_safe={a.retry_safe}) ran {n} times "
                f"in {row.attempts} attempt(s)"
            )
    if reasons:
        report.problems.append(f"commands failed for other reasons: {dict(reasons)}")
    known = {a.label for a in accepted}
    ghosts = sorted(set(runs) - known)
    if ghosts:
        report.problems.append(f"ran without being accepted: {ghosts[:5]} ({len(ghosts)})")
    if faults.end is not None and last_finish is not None:
        report.recover_s = round(max(0.0, last_finish.timestamp() - faults.end), 2)


def _ours(p: psutil.Process, stack: Stack) -> bool:
    root = str(stack.root)
    with contextlib.suppress(psutil.Error):
        if any(root in part for part in p.cmdline()):
            return True
        return bool(p.environ().get("EXECQ_TENANTS_FILE") == str(stack.tenants_path))
    return False


def _subscriptions(rds: RedisServer) -> list[str]:
    """Redis clients still subscribed to anything (pub/sub, patterns, shard channels)."""
    client = rds.client()
    try:
        return [
            f"{c.get('addr')} {c.get('name') or ''} sub={c.get('sub')} psub={c.get('psub')}"
            for c in client.client_list()
            if any(int(c.get(k) or 0) for k in ("sub", "psub", "ssub")) and not rds.own_client(c)
        ]
    finally:
        client.close()


def check_leaks(report: Report, stack: Stack, rds: RedisServer) -> None:
    """Processes, cgroups, private directories and Redis subscriptions the scenario's workers
    left behind (called after the live workers' warm shutdown and the producer's close, before
    anything is force-killed)."""
    me = os.getpid()
    procs = [p for p in psutil.process_iter() if p.pid != me and _ours(p, stack)]
    for p in procs:
        with contextlib.suppress(psutil.Error):
            report.problems.append(f"leaked process {p.pid}: {' '.join(p.cmdline())[:160]}")
    caps = detect_capabilities()
    pids = stack.seen_pool_pids | {w.pid for w in stack.workers}
    cgroups: list[str] = []
    for parent in (caps.memory_v1, caps.pids_v1, caps.cgroup_v2):
        if parent:
            for name in os.listdir(parent):
                match = CGROUP_PID.match(name)
                if match and int(match.group(1)) in pids:
                    cgroups.append(f"{parent}/{name}")
    report.problems.extend(f"leaked cgroup {c}" for c in cgroups)
    dirs = sorted(os.listdir(stack.workdir_root)) if stack.workdir_root.is_dir() else []
    report.problems.extend(f"leaked private directory {stack.workdir_root / d}" for d in dirs)
    subs = _subscriptions(rds)
    report.problems.extend(f"leaked Redis subscription: {s}" for s in subs)
    report.leaked = len(procs) + len(cgroups) + len(dirs) + len(subs)


def check_audit(report: Report, stack: Stack) -> None:
    """`execq audit verify` on the store's chains, and on the audit file."""
    done = stack.cli("audit", "verify", "--json")
    if done.returncode != 0:
        report.problems.append(
            f"audit verify exited {done.returncode}: {(done.stdout + done.stderr)[-800:]}"
        )
    check_audit_file(report, stack)


# Scenarios that kill no execq process: the audit file must end up with every event of the
# store (a process killed between the store's commit and its copy to the file loses that copy).
COMPLETE_AUDIT_FILE = {"audit-disk-full"}


def check_audit_file(report: Report, stack: Stack) -> None:
    """`execq audit verify --file` on the audit file (whole lines, an unbroken chain up to its
    last checkpoint); with `--complete` where `COMPLETE_AUDIT_FILE` says so: no event of the
    store missing from it."""
    path = Path(stack.vars["EXECQ_AUDIT_LOG"])
    if not path.exists():
        return
    complete = ["--complete"] if report.scenario in COMPLETE_AUDIT_FILE else []
    done = stack.cli("audit", "verify", "--file", str(path), *complete, "--json")
    if done.returncode != 0:
        report.problems.append(
            f"audit verify --file exited {done.returncode}: {(done.stdout + done.stderr)[-800:]}"
        )
