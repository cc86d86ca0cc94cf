"""`python -m bench.growth`: how execq's costs grow with concurrency, backlog, store size,
audit trail length and the reaper's backlogs.

1. end-to-end throughput (burst) and latency (paced) of execq on PostgreSQL, and of bare
   Celery, at worker concurrency 1, 2 and 4 and with two workers of concurrency 2;
2. the worker's claim and finishing write against pending backlog and rows in the store;
3. `audit verify` against chain length;
4. the reaper's scans, and one whole pass, against expired-lease and unpublished backlogs.

Tables on stdout, JSON to --out, PNG charts to --charts. Sections 2-4 run in-process on a
private database, dropped at the end; 10 million rows take about ten minutes to generate.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import redis

from bench import growth_report, growth_store
from bench.__main__ import otlp_sink, tracing_env
from bench.infra import PgDatabase, machine, stop_all
from bench.systems import Ctx, Res, run_celery, run_execq
from producer import telemetry
from workers.embedded import EmbeddedRedis, reachable

SECTIONS = ("concurrency", "claims", "audit", "sweeps")
# (system, concurrency per worker, worker processes)
SETUPS = [(s, c, 1) for s in ("execq", "celery") for c in (1, 2, 4)]
SETUPS += [("execq", 2, 2), ("celery", 2, 2)]
REDIS_URL = os.environ.get("EXECQ_BENCH_REDIS_URL", "redis://127.0.0.1:6379/14")
PG_URL = os.environ.get(
    "EXECQ_BENCH_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)


def _ints(text: str) -> list[int]:
    return [int(float(x)) for x in text.split(",") if x.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Flags; --quick is a ~1-minute smoke run with tiny numbers (the test's)."""
    ap = argparse.ArgumentParser(prog="python -m bench.growth", description=__doc__)
    ap.add_argument("--sections", default=",".join(SECTIONS), help="which, comma-separated")
    ap.add_argument("--n", type=int, help="commands per burst run (default 1500)")
    ap.add_argument("--repeat", type=int, help="burst runs per setup, interleaved (default 2)")
    ap.add_argument("--rate", type=float, help="paced runs: commands/s (default 50)")
    ap.add_argument(
        "--paced-seconds", type=float, help="paced runs: duration (default 10; 0: none)"
    )
    ap.add_argument("--warmup", type=int, help="warm-up commands per run (default 20)")
    ap.add_argument("--timeout", type=float, default=180.0, help="seconds per run, at most")
    ap.add_argument("--store-rows", type=_ints, help="store size tiers (default 0,1e6,1e7)")
    ap.add_argument("--pending", type=_ints, help="pending tiers (default 0,10000,100000)")
    ap.add_argument("--ops", type=int, help="claims and finishes per tier (default 300)")
    ap.add_argument("--events", type=_ints, help="audit chain tiers (default 1e3,1e4,1e5)")
    ap.add_argument("--backlog", type=_ints, help="sweep backlog tiers (default 0,1e4,1e5)")
    ap.add_argument("--redis-url", default=REDIS_URL, help="a Redis DB the bench may empty")
    ap.add_argument("--pg-url", default=PG_URL, help="PostgreSQL admin URL (private DBs)")
    ap.add_argument("--quick", action="store_true", help="tiny numbers, about a minute")
    ap.add_argument("--out", default="bench-results/growth.json", help="JSON results path")
    ap.add_argument("--charts", default="docs/img", help="directory for the PNG charts")
    args = ap.parse_args(argv)
    q = args.quick
    defaults: dict[str, Any] = {
        "n": 40 if q else 1500,
        "repeat": 1 if q else 2,
        "rate": 20.0 if q else 50.0,
        "paced_seconds": 0.0 if q else 10.0,
        "warmup": 2 if q else 20,
        "store_rows": [0, 1000] if q else [0, 1_000_000, 10_000_000],
        "pending": [0, 50, 200] if q else [0, 10_000, 100_000],
        "ops": 20 if q else 300,
        "events": [100, 500] if q else [1000, 10_000, 100_000],
        "backlog": [0, 50, 600] if q else [0, 10_000, 100_000],
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.sections = [s for s in args.sections.split(",") if s]
    if unknown := set(args.sections) - set(SECTIONS):
        ap.error(f"unknown section(s) {sorted(unknown)}; known: {', '.join(SECTIONS)}")
    return args


@contextlib.contextmanager
def environment(args: argparse.Namespace) -> Iterator[Ctx]:
    """Redis (embedded if none answers), a private PostgreSQL database, a temp dir, tracing as
    `python -m bench` traces; all undone at the end."""
    tmp = Path(tempfile.mkdtemp(prefix="execq-bench-growth-"))
    embedded: EmbeddedRedis | None = None
    pg: PgDatabase | None = None
    url = args.redis_url
    try:
        if not reachable(url):
            embedded = EmbeddedRedis(record=False).start()
            url = embedded.url
        pg = PgDatabase(args.pg_url)
        growth_store.open_store(pg.url).engine.dispose()  # migrated: the runs only truncate
        # The audit checkpoints of a database dropped at the end go to a witness of the run's
        # own, not the project's (which would then name chains no store has).
        os.environ["EXECQ_AUDIT_WITNESS"] = str(tmp / "audit-witness.jsonl")
        with otlp_sink() as otlp_url:
            os.environ.update(tracing_env(otlp_url))
            telemetry.configure(service_name="execq-bench-producer")
            yield Ctx(
                redis_url=url,
                pg=pg,
                tmp=tmp,
                timeout_s=args.timeout,
                warmup=args.warmup,
                otlp_url=otlp_url,
            )
    finally:
        stop_all()
        with contextlib.suppress(redis.RedisError):
            redis.Redis.from_url(url).flushdb()  # leave the bench's Redis DB empty
        if pg is not None:
            pg.drop()
        if embedded is not None:
            embedded.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def _run(ctx: Ctx, system: str, conc: int, procs: int, n: int, rate: float, tag: str) -> Res:
    """One run; an error becomes its status and the other runs go on."""
    try:
        if system == "celery":
            res = run_celery(ctx, n, rate, tag, concurrency=conc, processes=procs)
        else:
            res = run_execq(ctx, "pg", n, rate, tag, concurrency=conc, processes=procs)
    except Exception as exc:
        res = {"system": system, "status": f"error: {exc!r}"[:500]}
    return res


def concurrency_section(ctx: Ctx, args: argparse.Namespace, say: Any) -> list[Res]:
    """Burst runs interleaved round-robin (throughput), then one paced run each (latency;
    without paced runs, the first burst's, which mostly measures its queue)."""
    burst: dict[tuple[str, int, int], list[Res]] = {s: [] for s in SETUPS}
    paced: dict[tuple[str, int, int], Res] = {}
    for i in range(args.repeat):
        for setup in SETUPS:
            system, conc, procs = setup
            res = _run(ctx, system, conc, procs, args.n, 0.0, f"b{i}-{system}-{procs}x{conc}")
            burst[setup].append(res)
            say(_brief(setup, "burst", res))
    n_paced = round(args.rate * args.paced_seconds)
    for setup in SETUPS:
        system, conc, procs = setup
        if not n_paced:
            paced[setup] = burst[setup][0]
            continue
        paced[setup] = res = _run(ctx, system, conc, procs, n_paced, args.rate, f"p-{system}")
        say(_brief(setup, "paced", res))
    rows = []
    for setup in SETUPS:
        system, conc, procs = setup
        ok = [r["e2e_per_s"] for r in burst[setup] if r["status"] == "ok" and r.get("e2e_per_s")]
        p = paced[setup]
        rows.append(
            {
                "system": system,
                "concurrency": conc,
                "processes": procs,
                "ok": f"{len(ok)}/{len(burst[setup])}",
                "e2e_per_s": statistics.median(ok) if ok else None,
                "e2e_min": min(ok, default=None),
                "e2e_max": max(ok, default=None),
                "paced_status": p["status"],
                "latency_from": "paced" if n_paced else "burst",
                **{f"paced_{k}": p.get(k) for k in ("p50_ms", "p95_ms", "p99_ms")},
                "burst_runs": burst[setup],
            }
        )
    return rows


def _brief(setup: tuple[str, int, int], kind: str, res: Res) -> str:
    system, conc, procs = setup
    vals = " ".join(
        f"{k}={res[k]:.1f}" for k in ("e2e_per_s", "p50_ms", "p99_ms") if res.get(k) is not None
    )
    tail = f"\n{res['log_tail']}" if "log_tail" in res else ""
    return f"concurrency: {system} {procs}x{conc} {kind}: {res['status']} {vals}{tail}"


def _interrupt(*_: object) -> None:
    # SIGTERM gets the same cleanup (workers, database, Redis) as Ctrl-C
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """Run the sections asked for, print their tables, write JSON and charts; exit 1 if a run
    of the concurrency section did not complete."""
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    started = time.monotonic()

    def say(line: str) -> None:
        print(f"[{time.monotonic() - started:6.0f} s] {line}", flush=True)

    doc: dict[str, Any] = {"args": dict(vars(args))}
    with environment(args) as ctx:
        assert ctx.pg is not None
        doc["machine"] = machine(redis.Redis.from_url(ctx.redis_url), ctx.pg)
        if "concurrency" in args.sections:
            doc["concurrency"] = concurrency_section(ctx, args, say)
        store = growth_store.open_store(ctx.pg.url)
        try:
            if "claims" in args.sections:
                doc["claims"] = growth_store.claims_section(
                    store, args.store_rows, args.pending, args.ops, say
                )
            if "sweeps" in args.sections:
                # On top of the largest store the claims section left (or an empty one).
                doc["sweeps"] = growth_store.sweeps_section(
                    ctx.pg.url, ctx.redis_url, ctx.tmp, args.backlog, say
                )
        finally:
            store.engine.dispose()
        if "audit" in args.sections:
            # A database of its own: the other sections' commands left their events behind.
            audit_db = PgDatabase(args.pg_url)
            audit_store = growth_store.open_store(audit_db.url)
            try:
                doc["audit"] = growth_store.audit_section(audit_store, args.events, say)
            finally:
                audit_store.engine.dispose()
                audit_db.drop()
    doc["elapsed_s"] = time.monotonic() - started
    print()
    print(growth_report.tables(doc))
    charts = growth_report.charts(doc, Path(args.charts))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    doc["charts"] = [str(p) for p in charts]
    out.write_text(json.dumps(doc, indent=1, default=str))
    print(f"results: {out}; charts: {', '.join(map(str, charts))}")
    print(f"total time {doc['elapsed_s']:.0f} s")
    runs = [r for row in doc.get("concurrency", []) for r in row["burst_runs"]]
    paced_ok = all(row["paced_status"] == "ok" for row in doc.get("concurrency", []))
    return 0 if paced_ok and all(r["status"] == "ok" for r in runs) else 1


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except KeyboardInterrupt:
        print("\ninterrupted: workers stopped, bench database dropped", file=sys.stderr)
        raise SystemExit(130) from None
