"""`python -m bench.audit`: what the audit trail costs, per command and to verify.

For each store backend: the time and database round trips of a command's store writes
(create + claim + finish) with and without their audit events, in one process against the
same database; then `audit verify` over a trail of --events events, and the same for the
JSON-lines file.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event

from producer.audit.events import Outcome, Phase, Subject, make_event
from producer.audit.sinks import JsonlSink, verify_file
from producer.spec import CommandSpec, cmd_hash
from producer.states import State
from producer.store.db import make_engine
from producer.store.migrate import upgrade
from producer.store.repository import Store

PG_ADMIN = os.environ.get(
    "EXECQ_BENCH_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)


class RoundTrips:
    """Counts statements sent to the database (each one a round trip on PostgreSQL)."""

    def __init__(self, engine: sa.Engine) -> None:
        self.count = 0
        event.listen(engine, "before_cursor_execute", self._seen)

    def _seen(self, *_: Any) -> None:
        self.count += 1


def _events(subject: Subject, phases: list[Phase]) -> list[Any]:
    return [make_event(subject, p, Outcome.OK, actor="bench") for p in phases]


def one_command(store: Store, audited: bool, i: int) -> None:
    """The store writes of one successful command, as producer and worker make them."""
    spec = CommandSpec(tenant="bench", argv=("/bin/true", str(i)), principal="bench")
    cid = str(uuid.uuid4())
    subject = Subject(cid, "bench", "bench", cmd_hash(spec.argv), None)
    submit = _events(subject, [Phase.PARSE, Phase.AUTHZ]) if audited else []
    store.create(spec, actor="bench", command_id=cid, events=submit)
    claimed = store.claim(cid, tenant="bench", worker="w", lease_s=30)
    assert claimed is not None
    finish = _events(subject, [Phase.BIND, Phase.EXECUTE, Phase.ARCHIVE]) if audited else []
    store.transition(
        cid,
        expect_state=State.RUNNING,
        expect_version=claimed.version,
        to=State.SUCCEEDED,
        actor="w",
        events=finish,
        exit_code=0,
        stdout="",
        stderr="",
    )


def per_command(store: Store, trips: RoundTrips, n: int) -> dict[str, float]:
    """Median ms and mean statements per command, without and with audit events."""
    out: dict[str, float] = {}
    for audited in (False, True, False, True):  # interleaved; the second pair is kept
        times = []
        before = trips.count
        for i in range(n):
            t0 = time.perf_counter()
            one_command(store, audited, i)
            times.append(time.perf_counter() - t0)
        key = "audited" if audited else "plain"
        out[f"{key}_ms"] = statistics.median(times) * 1000
        out[f"{key}_statements"] = (trips.count - before) / n
    return out


def fill(store: Store, events: int) -> None:
    """`events` audit events: commands of five phases, appended as producer and worker do."""
    for i in range(events // 5):
        one_command(store, True, i)


@contextmanager
def database(backend: str, tmp: Path) -> Iterator[str]:
    if backend == "sqlite":
        yield f"sqlite:///{tmp}/bench-audit.db"
        return
    name = f"execq_bench_audit_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        yield admin.url.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.audit", description=__doc__)
    parser.add_argument("--events", type=int, default=10_000, help="trail size to verify")
    parser.add_argument("--n", type=int, default=300, help="commands per cost measurement")
    parser.add_argument("--backends", default="postgresql,sqlite")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="execq-bench-audit-") as tmpdir:
        tmp = Path(tmpdir)
        for backend in args.backends.split(","):
            with database(backend, tmp) as url:
                engine = make_engine(url)
                upgrade(engine)
                store = Store(engine)
                trips = RoundTrips(engine)
                cost = per_command(store, trips, args.n)
                print(
                    f"{backend}: store writes per command {cost['plain_ms']:.2f} ms -> "
                    f"{cost['audited_ms']:.2f} ms with 5 audit events "
                    f"(+{cost['audited_ms'] - cost['plain_ms']:.2f} ms); statements "
                    f"{cost['plain_statements']:.1f} -> {cost['audited_statements']:.1f}"
                )
                fill(store, args.events)
                total = sum(1 for _ in store.audit.events())
                t0 = time.perf_counter()
                report = store.audit.verify()
                elapsed = time.perf_counter() - t0
                assert report.ok, report.problem
                print(
                    f"{backend}: audit verify of {total} events: {elapsed:.2f} s "
                    f"({total / elapsed:,.0f} events/s)"
                )
                engine.dispose()
        sink = JsonlSink(tmp / "audit.jsonl")
        subject = Subject("c", "bench", "bench", cmd_hash(["/bin/true"]), None)
        t0 = time.perf_counter()
        for _ in range(args.events // 5):
            sink.append(
                _events(
                    subject, [Phase.BIND, Phase.EXECUTE, Phase.ARCHIVE, Phase.PARSE, Phase.AUTHZ]
                )
            )
        append_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        report = verify_file(tmp / "audit.jsonl")
        elapsed = time.perf_counter() - t0
        assert report.ok, report.problem
        print(
            f"file: append {append_s / (args.events / 5) * 1000:.3f} ms per 5-event batch; "
            f"verify of {report.events} events: {elapsed:.2f} s"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
