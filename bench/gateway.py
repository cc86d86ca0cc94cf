"""`python -m bench.gateway`: what the HTTP gateway costs a submit, against the Python API and
bare Celery in the same run, its memory, and how soon live output reaches an SSE client.

Submits (`/bin/true`, no worker consuming, so only the submit path is measured) go through:
bare Celery's `apply_async`; `Producer.submit` in this process (one thread, then 8 sharing
the producer); `POST /v1/commands` to a real `execq gateway` process, from one keep-alive
client, then from 8 at once. Then a real `execq worker` runs commands that print a timestamp
every 50 ms, followed on `GET /v1/commands/{id}/events`: each line's arrival minus its stamp.
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
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import redis
import sqlalchemy as sa

from bench.baseline import QUEUE, TASK, make_app
from bench.infra import PgDatabase, Worker, latency_ms, machine, server_cpu_s, stop_all
from producer.client import Producer
from producer.settings import Settings
from producer.spec import CommandSpec
from producer.store.db import make_engine
from producer.store.migrate import upgrade
from producer.tenants import load_tenants
from producer.tokens import Tokens
from workers.embedded import EmbeddedRedis, reachable

REDIS_URL = os.environ.get("EXECQ_BROKER_URL", "redis://127.0.0.1:6379/11")
PG_URL = os.environ.get(
    "EXECQ_BENCH_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
# The child's interpreter must be one the tenant allows by its resolved path.
PYTHON = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
TENANTS_YAML = """tenants:
  bench:
    concurrency: 2
    executables: [/bin/true]
    limits: {{timeout_s: 30, cpu_s: 10, memory_mb: 256, processes: 64, output_kb: 256}}
    http_rate: null
  live:
    concurrency: 1
    executables: [{python}]
    limits: {{timeout_s: 60, cpu_s: 30, memory_mb: 256, processes: 64, output_kb: 256}}
    http_rate: null
"""
PRINTER = "import time\nfor _ in range({n}):\n    print(repr(time.time()), flush=True)\n" + (
    "    time.sleep({gap})\n"
)
SYSTEMS = ("celery", "api", "api-8", "http", "http-8")
LABELS = {
    "celery": ("bare Celery apply_async", 1),
    "api": ("Producer.submit, in-process", 1),
    "api-8": ("Producer.submit, in-process", 8),
    "http": ("POST /v1/commands, keep-alive", 1),
    "http-8": ("POST /v1/commands, keep-alive", 8),
}
Res = dict[str, Any]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Flags; the defaults take about a minute and a half."""
    ap = argparse.ArgumentParser(prog="python -m bench.gateway", description=__doc__)
    ap.add_argument("--n", type=int, default=1000, help="submits per run (default 1000)")
    ap.add_argument("--repeat", type=int, default=2, help="interleaved runs per path (median)")
    ap.add_argument("--warmup", type=int, default=200, help="submits per path before the runs")
    ap.add_argument("--sse-lines", type=int, default=100, help="lines each command prints")
    ap.add_argument("--sse-commands", type=int, default=3, help="commands followed over SSE")
    ap.add_argument("--sse-gap", type=float, default=0.05, help="seconds between lines")
    ap.add_argument("--sqlite", action="store_true", help="SQLite store instead of PostgreSQL")
    ap.add_argument("--redis-url", default=REDIS_URL, help="Redis (default: DB 11 locally)")
    ap.add_argument("--json", action="store_true", help="print the results as JSON only")
    return ap.parse_args(argv)


def log(*parts: object) -> None:
    """Progress, on stderr: stdout holds the results."""
    print(*parts, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Stack:
    """What every run shares: settings, the gateway process, its URL and tokens."""

    settings: Settings
    tmp: Path
    gateway: Worker
    url: str
    tokens: dict[str, str]


def _free_port() -> int:
    import socket  # noqa: PLC0415

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _answers(port: int) -> bool:
    """Whether the gateway answers /healthz, within a few seconds."""
    for _ in range(100):
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200:
                return True
        time.sleep(0.05)
    return False


def _store_url(args: argparse.Namespace, tmp: Path) -> tuple[str, PgDatabase | None]:
    """A fresh, migrated store: a new PostgreSQL database, or SQLite with --sqlite (or when
    PostgreSQL cannot be used)."""
    pg = None
    url = f"sqlite:///{tmp}/bench.db"
    if not args.sqlite:
        try:
            pg = PgDatabase(PG_URL)
            url = pg.url
        except sa.exc.SQLAlchemyError as exc:
            log(f"# PostgreSQL unusable, SQLite instead: {str(exc).splitlines()[0]}")
    engine = make_engine(url)
    upgrade(engine)
    engine.dispose()
    return url, pg


def _execq_env(settings: Settings, audit: Path) -> dict[str, str]:
    values = settings.model_dump(mode="json") | {"audit_log": str(audit)}
    env = {f"EXECQ_{k.upper()}": str(v) for k, v in values.items() if v is not None}
    # Tracing off in every process, as in this one: the HTTP path's cost alone is measured.
    return {**os.environ, **env, "OTEL_TRACES_EXPORTER": "none"}


@contextlib.contextmanager
def stack(args: argparse.Namespace) -> Iterator[tuple[Stack, redis.Redis, PgDatabase | None]]:
    """Redis, a store, a tenants file, tokens and a running gateway; all undone afterwards.

    Every Redis key of the run is under a namespace of its own, deleted at the end, so the
    Redis database may be shared.
    """
    tmp = Path(tempfile.mkdtemp(prefix="execq-bench-gw-"))
    namespace = f"benchgw-{uuid.uuid4().hex[:8]}"
    embedded: EmbeddedRedis | None = None
    pg: PgDatabase | None = None
    url = args.redis_url
    r: redis.Redis | None = None
    try:
        if not reachable(url):
            embedded = EmbeddedRedis(record=False).start()
            url = embedded.url
        r = redis.Redis.from_url(url)
        db_url, pg = _store_url(args, tmp)
        tenants_file = tmp / "tenants.yaml"
        tenants_file.write_text(TENANTS_YAML.format(python=PYTHON))
        settings = Settings(
            database_url=db_url,
            broker_url=url,
            tenants_file=tenants_file,
            workdir_root=tmp / "work",
            audit_log=tmp / "audit-bench.jsonl",
            namespace=namespace,
        )
        with Producer.from_settings(settings, load_tenants(tenants_file)) as producer:
            made = Tokens(producer.store)
            tokens = {
                t: made.create(tenant=t, scopes=["submit", "read"], name=f"bench-{t}")[1]
                for t in ("bench", "live")
            }
        port = _free_port()
        argv = [sys.executable, "-m", "workers.cli", "gateway", "--port", str(port)]
        env = _execq_env(settings, tmp / "audit-gateway.jsonl")
        gateway = Worker([*argv, "--no-access-log"], env, tmp / "gateway.log")
        if not gateway.wait_line("ready on", time.monotonic() + 60) or not _answers(port):
            raise RuntimeError(f"the gateway did not start:\n{gateway.output()}")
        yield Stack(settings, tmp, gateway, f"http://127.0.0.1:{port}", tokens), r, pg
    finally:
        stop_all()
        if r is not None:
            with contextlib.suppress(redis.RedisError):
                keys = list(r.scan_iter(match=f"{namespace}.*", count=1000))
                if keys:
                    r.delete(*keys)
            r.close()
        if pg is not None:
            pg.drop()
        if embedded is not None:
            embedded.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def timed(send: Callable[[int], None], n: int, clients: int, gateway: Worker) -> Res:
    """n calls of send(client), split over `clients` threads started together: the rate,
    each call's latency, and the CPU each process spent per call."""
    latencies: list[float] = []
    errors: list[str] = []
    gate = threading.Barrier(clients + 1)

    def loop(client: int, count: int) -> None:
        mine = []
        gate.wait()
        for _ in range(count):
            t0 = time.perf_counter()
            try:
                send(client)
            except Exception as exc:
                errors.append(repr(exc)[:300])
            mine.append(time.perf_counter() - t0)
        latencies.extend(mine)

    shares = [n // clients + (i < n % clients) for i in range(clients)]
    threads = [threading.Thread(target=loop, args=(i, k)) for i, k in enumerate(shares)]
    for t in threads:
        t.start()
    proc = psutil.Process(gateway.proc.pid)
    servers0, gw0, own0 = server_cpu_s(), sum(proc.cpu_times()[:2]), time.process_time()
    gate.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    res: Res = {"n": n, "clients": clients, "submit_per_s": n / wall, **latency_ms(latencies)}
    res["client_cpu_ms"] = 1000 * (time.process_time() - own0) / n
    res["gateway_cpu_ms"] = 1000 * (sum(proc.cpu_times()[:2]) - gw0) / n
    for name, cpu in server_cpu_s().items():
        res[f"{name}_cpu_ms"] = 1000 * (cpu - servers0[name]) / n
    res["errors"] = len(errors)
    if errors:
        res["error_sample"] = errors[0]
    return res


def senders(s: Stack, producer: Producer) -> tuple[dict[str, Callable[[int], None]], list[Any]]:
    """One send function per system (its argument: which client), and what to close."""
    capp = make_app(s.settings.broker_url)
    # The run's namespace, as execq's own keys have it, so that the cleanup finds the queue.
    capp.conf.broker_transport_options = {"global_keyprefix": f"{s.settings.namespace}."}
    task = capp.tasks[TASK]
    spec = CommandSpec(tenant="bench", argv=("/bin/true",))
    auth = {"Authorization": f"Bearer {s.tokens['bench']}"}
    # One keep-alive connection per client, as a backend's HTTP client pool of one.
    one = httpx.Limits(max_keepalive_connections=1, max_connections=1)
    clients = [httpx.Client(base_url=s.url, headers=auth, timeout=30, limits=one) for _ in range(8)]
    body = {"argv": ["/bin/true"]}

    def celery(_: int) -> None:
        task.apply_async(args=(time.time(),), queue=QUEUE)

    def api(_: int) -> None:
        producer.submit(spec)

    def http(client: int) -> None:
        answer = clients[client].post("/v1/commands", json=body)
        if answer.status_code != 201:
            raise RuntimeError(f"{answer.status_code} {answer.text[:200]}")

    sends = {"celery": celery, "api": api, "api-8": api, "http": http, "http-8": http}
    return sends, [capp, *clients]


def brief(name: str, res: Res) -> str:
    """One progress line per run."""
    failed = f" FAILED {res['errors']}: {res['error_sample']}" if res["errors"] else ""
    return (
        f"{name:<7} {res['submit_per_s']:6.0f}/s p50 {res['p50_ms']:.2f} "
        f"p99 {res['p99_ms']:.2f} ms{failed}"
    )


def submit_runs(s: Stack, args: argparse.Namespace) -> dict[str, list[Res]]:
    """Every system's runs, interleaved round-robin --repeat times, after a warm-up each."""
    runs: dict[str, list[Res]] = {name: [] for name in SYSTEMS}
    tenants = load_tenants(s.settings.tenants_file)
    with Producer.from_settings(s.settings, tenants) as producer:
        sends, closing = senders(s, producer)
        try:
            for name in SYSTEMS:
                clients = LABELS[name][1]
                timed(sends[name], max(args.warmup, clients), clients, s.gateway)
            for i in range(args.repeat):
                for name in SYSTEMS:
                    res = timed(sends[name], args.n, LABELS[name][1], s.gateway)
                    runs[name].append(res)
                    log(f"[{i + 1}/{args.repeat}] {brief(name, res)}")
        finally:
            for thing in closing:
                thing.close()
    return runs


def sse_events(lines: Iterator[str]) -> Iterator[dict[str, str]]:
    """The events of a text/event-stream as dicts of their fields (comments skipped)."""
    event: dict[str, str] = {}
    for line in lines:
        if not line:
            if event:
                yield event
            event = {}
        elif not line.startswith(":"):
            name, _, value = line.partition(":")
            event[name] = value.removeprefix(" ")


def follow(client: httpx.Client, args: argparse.Namespace) -> tuple[list[float], str]:
    """Run one printing command and follow its events: each line's delay (s), final state."""
    code = PRINTER.format(n=args.sse_lines, gap=args.sse_gap)
    made = client.post("/v1/commands", json={"argv": [PYTHON, "-c", code]})
    made.raise_for_status()
    delays: list[float] = []
    partial = ""
    with client.stream("GET", f"/v1/commands/{made.json()['id']}/events") as stream:
        for event in sse_events(stream.iter_lines()):
            arrived = time.time()
            if event.get("event") == "stdout":
                *whole, partial = (partial + json.loads(event["data"])["text"]).split("\n")
                delays += [arrived - float(stamp) for stamp in whole if stamp]
            elif event.get("event") == "end":
                return delays, str(json.loads(event["data"])["state"])
    return delays, "stream ended without an end event"


def sse_run(s: Stack, args: argparse.Namespace) -> Res:
    """A real worker for the `live` tenant, and --sse-commands commands followed one by one."""
    argv = [sys.executable, "-m", "workers.cli", "worker", "--tenant", "live"]
    env = _execq_env(s.settings, s.tmp / "audit-worker.jsonl")
    worker = Worker([*argv, "--loglevel", "WARNING"], env, s.tmp / "worker.log")
    res: Res = {"commands": args.sse_commands, "lines_printed": args.sse_commands * args.sse_lines}
    try:
        if not worker.wait_line(" ready", time.monotonic() + 60):
            raise RuntimeError(f"the worker did not start:\n{worker.output()}")
        auth = {"Authorization": f"Bearer {s.tokens['live']}"}
        delays: list[float] = []
        states = []
        with httpx.Client(base_url=s.url, headers=auth, timeout=60) as client:
            for _ in range(args.sse_commands):
                got, state = follow(client, args)
                delays += got
                states.append(state)
        res.update(lines_seen=len(delays), final_states=states)
        if delays:  # the least: the path itself, without waiting for the publisher's flush
            res.update(latency_ms(delays), min_ms=1000 * min(delays))
        return res
    finally:
        worker.stop()


def _med(runs: list[Res], key: str) -> float:
    return float(statistics.median(r[key] for r in runs))


def summarize(runs: dict[str, list[Res]]) -> dict[str, Res]:
    """Each system's medians over its runs."""
    keys = ("submit_per_s", "p50_ms", "p95_ms", "p99_ms", "client_cpu_ms", "gateway_cpu_ms")
    rows = {}
    for name, rs in runs.items():
        row: Res = {k: _med(rs, k) for k in (*keys, "redis_cpu_ms", "postgres_cpu_ms")}
        row["errors"] = sum(r["errors"] for r in rs)
        rows[name] = row
    return rows


def ratios(rows: dict[str, Res]) -> dict[str, float]:
    """Submit rates of the gateway against the Python API and bare Celery."""
    rate = {name: row["submit_per_s"] for name, row in rows.items()}
    return {
        "http_vs_api": rate["http"] / rate["api"],
        "http8_vs_api8": rate["http-8"] / rate["api-8"],
        "http_vs_celery": rate["http"] / rate["celery"],
        "http8_vs_celery": rate["http-8"] / rate["celery"],
    }


def table(rows: dict[str, Res]) -> str:
    """One line per path: rate, latency, and the CPU of each process per submit."""
    hdr = ["path", "clients", "submits/s", "p50/p95/p99 ms", "CPU ms/submit client+gw+redis+pg"]
    lines = [hdr]
    for name, r in rows.items():
        label, clients = LABELS[name]
        cpu = (r["client_cpu_ms"], r["gateway_cpu_ms"], r["redis_cpu_ms"], r["postgres_cpu_ms"])
        lines.append(
            [
                label,
                str(clients),
                f"{r['submit_per_s']:.0f}",
                "/".join(f"{r[f'p{p}_ms']:.2f}" for p in (50, 95, 99)),
                "+".join(f"{c:.2f}" for c in cpu) + f" = {sum(cpu):.2f}",
            ]
        )
    width = [max(len(x[i]) for x in lines) for i in range(len(hdr))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(x, width, strict=True)) for x in lines)


def findings(doc: Res) -> str:
    """One line: the ratios, the memory and the live-output delay."""
    q, sse, rss = doc["ratios"], doc["sse"], doc["gateway_rss_mib"]
    live = (
        f"SSE line delay p50 {sse['p50_ms']:.1f} / p99 {sse['p99_ms']:.1f} ms "
        f"({sse['lines_seen']}/{sse['lines_printed']} lines)"
        if "p50_ms" in sse
        else "SSE: no line arrived"
    )
    return (
        f"gateway / Python API {q['http_vs_api']:.2f}x (8 clients: {q['http8_vs_api8']:.2f}x of "
        f"8 threads), gateway / bare Celery {q['http_vs_celery']:.2f}x "
        f"(8 clients {q['http8_vs_celery']:.2f}x); gateway RSS {rss['end']:.0f} MiB; {live}"
    )


def problems(doc: Res) -> list[str]:
    """What went wrong: failed submits, lost lines, commands that did not succeed."""
    rows = doc["rows"].items()
    out = [f"!! {name}: {r['errors']} submits failed" for name, r in rows if r["errors"]]
    sse = doc["sse"]
    if sse.get("lines_seen") != sse["lines_printed"]:
        out.append(f"!! SSE: {sse.get('lines_seen')} of {sse['lines_printed']} lines arrived")
    out += [f"!! SSE command ended {s}" for s in sse.get("final_states", []) if s != "succeeded"]
    return out


def _interrupt(*_: object) -> None:
    # SIGTERM gets the same cleanup (gateway, worker, database, Redis keys) as Ctrl-C
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """Run everything and print the table (or the JSON); exit 1 if anything failed."""
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    started = time.monotonic()
    with stack(args) as (s, r, pg):
        info = machine(r, pg)
        log(f"# gateway {s.url}, store {'PostgreSQL' if pg else 'SQLite'}, N={args.n}")
        rss = {"ready": s.gateway.rss_mb()[0]}
        runs = submit_runs(s, args)
        rss["after_submits"] = s.gateway.rss_mb()[0]
        sse = sse_run(s, args)
        rss["end"] = s.gateway.rss_mb()[0]
    rows = summarize(runs)
    doc: Res = {
        "machine": info,
        "args": vars(args),
        "store": "postgresql" if pg else "sqlite",
        "namespace": s.settings.namespace,
        "rows": rows,
        "ratios": ratios(rows),
        "gateway_rss_mib": rss,
        "sse": sse,
        "runs": runs,
        "elapsed_s": time.monotonic() - started,
    }
    bad = problems(doc)
    if args.json:
        print(json.dumps(doc, indent=1, default=str))
    else:
        print(
            f"# {info['nproc']} CPU ({info['cpu']}), {info['ram_gb']} GB RAM, Python "
            f"{info['python']}, Redis {info['redis_server']}, store {doc['store']}; "
            f"N={args.n} per run, median of {args.repeat}; tracing off"
        )
        print(table(rows))
        print(findings(doc))
        for line in [*bad, f"total time {doc['elapsed_s']:.0f} s"]:
            print(line)
    return 1 if bad else 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except KeyboardInterrupt:
        print("\ninterrupted: gateway and worker stopped", file=sys.stderr)
        raise SystemExit(130) from None
