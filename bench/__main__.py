"""`python -m bench`: execq vs bare Celery, same subprocess call, same concurrency, one run.

Throughput runs (burst: one producer flat out) are interleaved round-robin --repeat times and
reported as medians; then paced runs (--rate/s for --paced-seconds) give submit→finish latency.
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

import redis
import sqlalchemy as sa

from bench.infra import PACKAGES, PgDatabase, machine, stop_all
from bench.systems import Ctx, Res, run_celery, run_execq
from producer import telemetry
from producer.store.db import make_engine
from producer.store.migrate import upgrade
from workers.embedded import EmbeddedRedis, reachable

SYSTEMS = ("celery", "celery-pg", "execq-pg", "execq-pg-batch", "execq-sqlite")
BATCH = 100  # commands per submit_many call in the execq-pg-batch runs
# Every execq run traces like a production deployment would: 10 % of the commands sampled
# (decided at submit, followed by the worker), their spans exported over OTLP/HTTP.
SAMPLE_RATIO = "0.1"
BURST_MEDIANS = (
    "submit_per_s",
    "redis_cmds_per_cmd",
    "producer_cpu_ms",
    "worker_cpu_ms",
    "redis_cpu_ms",
    "postgres_cpu_ms",
    "rss_main_mb",
)
PACED = ("celery", "celery-pg", "execq-pg")
REDIS_URL = os.environ.get("EXECQ_BENCH_REDIS_URL", "redis://127.0.0.1:6379/14")
PG_URL = os.environ.get(
    "EXECQ_BENCH_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
COLUMNS = (
    "system",
    "ok",
    "e2e/s (min-max)",
    "ratio vs celery",
    "submit/s",
    "p50/p95/p99 ms @{r}/s",
    "RSS MB/pool proc",
    "db xact/cmd",
    "redis cmd/cmd",
    "cpu ms/cmd prod+wrk+redis+pg",
    "total",
)
NOTES = """\
celery-pg: bare Celery plus a PostgreSQL row per command (inserted before the send, claimed and
  finished by the task; 3 commits, raw psycopg): what a durable record alone costs.
every execq run: store, audit (store + file), sandbox limits, tracing sampled at 10 % (OTLP/HTTP).
execq-pg-batch: the same, submitted with submit_many({batch}) instead of one submit per command.
e2e/s: N={n} submitted flat out by one process, N / (first submit -> last finish); median (min-max)
  of {repeat} interleaved runs per system, each on a fresh worker after {warmup} warm-up commands.
submit/s: the producer's submit loop in those runs, with the worker running meanwhile.
latency @{rate:g}/s for {paced_seconds:g} s: execq created_at -> finished_at (store), celery
  enqueue -> end of task; both from this host's clock.
RSS: pool processes after the runs (median). db xact/cmd: pg_stat_database xact_commit delta per
  command (incl. warm-up, worker start-up, reaper; pool pre-pings are transactions too).
redis cmd/cmd: INFO commandstats delta / N in the burst runs, the bench's own commands excluded,
  background traffic (heartbeats, task events, reaper) included.
cpu ms/cmd: producer process + worker process tree (incl. /bin/true) + redis-server + every
  PostgreSQL process (the bench's own completion polling included), burst runs; total: their sum,
  what one command costs the machine."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Flags; --quick shrinks everything to a ~30 s smoke run."""
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    ap.add_argument("--n", type=int, help="commands per throughput run (default 1500)")
    ap.add_argument("--repeat", type=int, help="throughput runs per system (default 3)")
    ap.add_argument("--rate", type=float, default=50.0, help="paced runs: commands/s")
    ap.add_argument("--paced-seconds", type=float, help="paced runs: duration (default 10)")
    ap.add_argument("--paced-repeat", type=int, default=1, help="paced runs per system")
    ap.add_argument("--warmup", type=int, default=20, help="warm-up commands per run")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds per run, at most")
    ap.add_argument("--quick", action="store_true", help="smoke version (~30 s)")
    ap.add_argument("--profile", action="store_true", help="+1 execq-pg run, submit loop profiled")
    ap.add_argument("--out", default="bench-results/latest.json", help="JSON results path")
    args = ap.parse_args(argv)
    args.n = args.n or (150 if args.quick else 1500)
    args.repeat = args.repeat or (1 if args.quick else 3)
    args.paced_seconds = args.paced_seconds or (3.0 if args.quick else 10.0)
    args.warmup = min(args.warmup, 10) if args.quick else args.warmup
    return args


@contextlib.contextmanager
def environment(args: argparse.Namespace) -> Iterator[Ctx]:
    """Redis (embedded if none answers), a fresh PostgreSQL database, a temp dir; all undone."""
    tmp = Path(tempfile.mkdtemp(prefix="execq-bench-"))
    embedded: EmbeddedRedis | None = None
    pg: PgDatabase | None = None
    url = REDIS_URL
    try:
        if not reachable(url):
            embedded = EmbeddedRedis(record=False).start()
            url = embedded.url
        try:
            pg = PgDatabase(PG_URL)
            engine = make_engine(pg.url)
            upgrade(engine)
            engine.dispose()
        except sa.exc.SQLAlchemyError as exc:
            print(f"# PostgreSQL unusable, execq-pg skipped: {str(exc).splitlines()[0]}")
            if pg is not None:
                pg.drop()
                pg = None
        with otlp_sink() as otlp_url:
            # The bench process submits like a traced web backend: its sampler decides.
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


def tracing_env(otlp_url: str) -> dict[str, str]:
    """OTEL_* for a 10 % parent-based sample exported to `otlp_url`."""
    return {
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_ENDPOINT": otlp_url,
        "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
        "OTEL_TRACES_SAMPLER_ARG": SAMPLE_RATIO,
    }


@contextlib.contextmanager
def otlp_sink() -> Iterator[str]:
    """An OTLP/HTTP endpoint that accepts spans and drops them (a collector's cost is not
    execq's)."""
    import http.server  # noqa: PLC0415
    import threading  # noqa: PLC0415

    class Sink(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length", "0")))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *_: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Sink)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


def run(ctx: Ctx, system: str, n: int, rate: float, tag: str) -> Res:
    """One run of one system; errors become a status, the other runs go on."""
    if "-pg" in system and ctx.pg is None:
        return {"system": system, "status": "skipped (no PostgreSQL)"}
    try:
        if system.startswith("celery"):
            return run_celery(ctx, n, rate, tag, durable=system == "celery-pg")
        if system == "execq-pg-batch":
            return run_execq(ctx, "pg", n, rate, tag, batch=BATCH)
        return run_execq(ctx, system.removeprefix("execq-"), n, rate, tag)
    except Exception as exc:
        return {"system": system, "status": f"error: {exc!r}"[:500]}


def brief(tag: str, res: Res) -> str:
    """One progress line per run."""
    keys = "e2e_per_s submit_per_s p50_ms p99_ms producer_cpu_ms worker_cpu_ms redis_cmds_per_cmd"
    vals = " ".join(f"{k}={res[k]:.1f}" for k in keys.split() if isinstance(res.get(k), float))
    fails = f" FAILED {dict(res['failures'])}" if sum(res.get("failures", {}).values()) else ""
    tail = f"\n{res['log_tail']}" if "log_tail" in res else ""
    return f"[{tag}] {res['system']:<13} {res['status']} {vals}{fails}{tail}"


def med(runs: list[Res], key: str) -> float | None:
    """Median of a per-run number over the runs that completed."""
    vals = [r[key] for r in runs if r["status"] == "ok" and r.get(key) is not None]
    return statistics.median(vals) if vals else None


def summarize(system: str, burst: list[Res], paced: list[Res]) -> Res:
    """The table row of one system: medians over its runs."""
    ok = [r for r in burst if r["status"] == "ok"]
    e2e = [r["e2e_per_s"] for r in ok if r.get("e2e_per_s")]
    pools = [mb for r in ok + paced for mb in r.get("rss_pool_mb", [])]
    xact = [r["pg_per_cmd"]["xact_commit"] for r in burst + paced if "pg_per_cmd" in r]
    stages = [r["stages_p50_ms"] for r in paced if "stages_p50_ms" in r]
    row = {
        "system": system,
        "ok": f"{len(ok)}/{len(burst)}",
        "failed_commands": sum(sum(r.get("failures", {}).values()) for r in burst + paced),
        "e2e_per_s": statistics.median(e2e) if e2e else None,
        "e2e_min": min(e2e, default=None),
        "e2e_max": max(e2e, default=None),
        "rss_pool_mb": statistics.median(pools) if pools else None,
        "db_xact_per_cmd": statistics.median(xact) if xact else None,
        "paced_stages_p50_ms": {
            k: statistics.median(s[k] for s in stages) for k in (stages[0] if stages else {})
        },
    }
    row.update({key: med(burst, key) for key in BURST_MEDIANS})
    row.update({f"paced_{key}": med(paced, key) for key in ("p50_ms", "p95_ms", "p99_ms")})
    return row


def _f(v: float | None, fmt: str = "{:.0f}") -> str:
    return "-" if v is None else fmt.format(v)


CPU_PARTS = ("producer_cpu_ms", "worker_cpu_ms", "redis_cpu_ms", "postgres_cpu_ms")


def _total_cpu(row: Res) -> float | None:
    parts = [row.get(k) for k in CPU_PARTS]
    return None if any(p is None for p in parts) else sum(parts)  # type: ignore[arg-type]


def table(rows: list[Res], rate: float) -> str:
    """The summary table, one line per system."""
    base, lines = rows[0]["e2e_per_s"], []
    for r in rows:
        e2e, lat = r["e2e_per_s"], (r[f"paced_p{k}_ms"] for k in (50, 95, 99))
        lines.append(
            [
                r["system"],
                r["ok"],
                "-" if e2e is None else f"{e2e:.0f} ({r['e2e_min']:.0f}-{r['e2e_max']:.0f})",
                "-" if not (e2e and base) else f"{e2e / base:.2f}x",
                _f(r["submit_per_s"]),
                "-" if r["paced_p50_ms"] is None else "/".join(f"{x:.1f}" for x in lat),
                _f(r["rss_pool_mb"], "{:.1f}"),
                _f(r["db_xact_per_cmd"], "{:.2f}"),
                _f(r["redis_cmds_per_cmd"], "{:.1f}"),
                "+".join(_f(r[k], "{:.2f}") for k in CPU_PARTS),
                _f(_total_cpu(r), "{:.2f}"),
            ]
        )
    hdr = [c.format(r=f"{rate:g}") for c in COLUMNS]
    width = [max(len(h), *(len(x[i]) for x in lines)) for i, h in enumerate(hdr)]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(x, width, strict=True)).rstrip() for x in [hdr, *lines]
    )


def findings(rows: list[Res], runs: list[Res]) -> list[str]:
    """Ratios worth reading, and everything that went wrong."""
    out = []
    by = {r["system"]: r for r in rows}
    c, e = by["celery"], by["execq-pg"]
    if c["paced_p50_ms"] and e["paced_p50_ms"]:
        out.append(
            f"paced execq-pg / celery: p50 {e['paced_p50_ms'] / c['paced_p50_ms']:.1f}x, "
            f"p99 {e['paced_p99_ms'] / c['paced_p99_ms']:.1f}x; execq-pg p50 per stage: "
            + ", ".join(f"{k} {v:.1f} ms" for k, v in e["paced_stages_p50_ms"].items())
        )
    floor = by.get("celery-pg")
    if floor and floor.get("e2e_per_s") and c.get("e2e_per_s") and e.get("e2e_per_s"):
        out.append(
            f"durable floor: celery-pg {floor['e2e_per_s'] / c['e2e_per_s']:.2f}x celery; "
            f"execq-pg {e['e2e_per_s'] / floor['e2e_per_s']:.2f}x celery-pg; total CPU/cmd "
            f"celery {_f(_total_cpu(c), '{:.2f}')}, celery-pg {_f(_total_cpu(floor), '{:.2f}')}, "
            f"execq-pg {_f(_total_cpu(e), '{:.2f}')} ms"
        )
    b = by.get("execq-pg-batch")
    if b and b.get("submit_per_s") and e.get("submit_per_s"):
        ratio = f" = {b['e2e_per_s'] / c['e2e_per_s']:.2f}x celery" if c.get("e2e_per_s") else ""
        out.append(
            f"submit_many({BATCH}) vs submit: {b['submit_per_s']:.0f} vs "
            f"{e['submit_per_s']:.0f} submits/s, producer CPU {b['producer_cpu_ms']:.2f} vs "
            f"{e['producer_cpu_ms']:.2f} ms/cmd; e2e {b['e2e_per_s'] or 0:.0f}/s{ratio}"
        )
    out += [
        f"!! {r['system']}: {r['failed_commands']} command(s) did not succeed"
        for r in rows
        if r["failed_commands"]
    ]
    for r in runs:
        if r["status"] != "ok":
            done = f", {r['completed']} of {r['n']} done" if "completed" in r else ""
            out.append(f"!! a {r['system']} run: {r['status']}{done}")
    if any(r.get("redis_other_db_traffic") for r in runs):
        out.append(
            "!! other Redis databases were busy during some runs (someone else's load): "
            "redis cmd/cmd may be inflated and the timings noisier"
        )
    return out


def _interrupt(*_: object) -> None:
    # SIGTERM gets the same cleanup (every finally: workers, database, Redis) as Ctrl-C
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """Run everything, print the table, write the JSON; exit 1 if a run did not complete."""
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    started = time.monotonic()
    burst: dict[str, list[Res]] = {s: [] for s in SYSTEMS}
    paced: dict[str, list[Res]] = {s: [] for s in SYSTEMS}
    profile = None
    with environment(args) as ctx:
        info = machine(redis.Redis.from_url(ctx.redis_url), ctx.pg)
        print(
            f"# {info['nproc']} CPU ({info['cpu']}), {info['ram_gb']} GB RAM, "
            f"kernel {info['kernel']}, Python {info['python']}"
        )
        servers = ("redis_server", "postgresql", "sqlite")
        print("# " + ", ".join(f"{k} {info[k]}" for k in (*PACKAGES, *servers) if k in info))
        print(
            f"# redis {ctx.redis_url}, concurrency 2, N={args.n}, repeat={args.repeat}, "
            f"paced {args.rate:g}/s x {args.paced_seconds:g} s",
            flush=True,
        )
        plan = [
            (f"burst {i + 1}/{args.repeat}", s, args.n, 0.0, burst)
            for i in range(args.repeat)
            for s in SYSTEMS
        ]
        n_paced = round(args.rate * args.paced_seconds)
        plan += [
            (f"paced {i + 1}/{args.paced_repeat}", s, n_paced, args.rate, paced)
            for i in range(args.paced_repeat)
            for s in PACED
        ]
        for label, system, n, rate, into in plan:
            res = run(ctx, system, n, rate, f"{label.replace(' ', '').replace('/', 'of')}-{system}")
            into[system].append(res)
            print(brief(label, res), flush=True)
        if args.profile and ctx.pg is not None:
            profile = run_execq(ctx, "pg", args.n, 0.0, "profile", profile=True).get("profile")
    rows = [summarize(s, burst[s], paced[s]) for s in SYSTEMS]
    runs = [r for d in (burst, paced) for rs in d.values() for r in rs]
    elapsed = time.monotonic() - started
    print(f"\n{table(rows, args.rate)}\n")
    print(NOTES.format(batch=BATCH, **vars(args)))
    for line in [*findings(rows, runs), f"total time {elapsed:.0f} s"]:
        print(line)
    if profile:
        print("\ncProfile of the execq-pg submit loop (extra run), top cumulative:\n" + profile)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "machine": info,
        "args": vars(args),
        "elapsed_s": elapsed,
        "summary": rows,
        "burst_runs": burst,
        "paced_runs": paced,
        "profile": profile,
    }
    out.write_text(json.dumps(doc, indent=1, default=str))
    print(f"results: {out}")
    return 0 if all(r["status"] == "ok" for r in runs) else 1


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except KeyboardInterrupt:
        print("\ninterrupted: workers stopped, bench database dropped", file=sys.stderr)
        raise SystemExit(130) from None
