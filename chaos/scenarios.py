"""The scenarios: one fault each, injected while the command stream runs, then the checks."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

import sqlalchemy as sa

from chaos.canary import check_canary
from chaos.checks import Faults, Report, check_audit, check_commands, check_leaks, wait_settled
from chaos.diskfull import audit_on_tmpfs, fill_audit_disk
from chaos.faults import (
    clock_ahead,
    kill_children,
    restart_postgres,
    stop_worker,
    tamper_broker,
)
from chaos.gateway_fault import gateway_setup, kill_gateway
from chaos.load import Stream
from chaos.sentinel import fail_over, sentinel_set
from chaos.servers import PgCluster, RedisServer
from chaos.stack import Stack
from producer.store.db import make_engine

WORKERS = 2


@dataclass(frozen=True)
class Options:
    """How big and how long: `short` scales the faults down for CI."""

    commands: int = 2000
    rate_per_s: float = 60.0
    short: bool = False
    settle_s: float = 120.0  # after the stream, until nothing is pending or running
    seed: int = 0


@dataclass
class Run:
    """What an injector may touch while the stream runs."""

    opts: Options
    stack: Stack
    redis: RedisServer
    pg: PgCluster
    stream: Stream
    faults: Faults
    rng: random.Random

    def at_fraction(self, fraction: float) -> None:
        """Wait until this share of the stream has been submitted (or the stream is over)."""
        target = fraction * self.opts.commands
        while self.stream.progress < target and self.streaming():
            time.sleep(0.05)

    def streaming(self) -> bool:
        return not self.stream.join(0)


Injector = Callable[[Run], None]


def kill_pool_processes(run: Run) -> None:
    """SIGKILL a random pool process every 0.5-1.5 s until the stream ends."""
    run.at_fraction(0.1)
    limit = 3 if run.opts.short else 1000
    kills = 0
    while run.streaming() and kills < limit:
        time.sleep(run.rng.uniform(0.5, 1.5))
        run.stack.note_pools()
        pools = [p for w in run.stack.live_workers() for p in w.pool_pids()]
        if not pools:
            continue
        pid = run.rng.choice(pools)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
            run.faults.killed_pids.add(pid)
            run.faults.note(f"SIGKILL pool process {pid}")
            kills += 1
        run.faults.end = time.time()
    # billiard replaces a killed pool process: its successor must be known to the leak checks
    time.sleep(1.0)
    run.stack.note_pools()


def kill_worker_main(run: Run) -> None:
    """SIGKILL one worker's main process (its pool is orphaned), then start a new worker."""
    for fraction in (0.3,) if run.opts.short else (0.3, 0.6):
        run.at_fraction(fraction)
        live = run.stack.live_workers()
        victim = run.rng.choice(live)
        run.stack.note_pools()
        pool = victim.pool_pids()
        run.faults.killed_pids.update([victim.pid, *pool])
        os.kill(victim.pid, signal.SIGKILL)
        run.faults.note(f"SIGKILL worker main {victim.pid} (pool {pool})")
        time.sleep(1.0)
        fresh = run.stack.start_worker()
        run.faults.note(f"started worker {fresh.pid}")
        run.faults.end = time.time()


def restart_redis(run: Run) -> None:
    """Crash Redis (SIGKILL) mid-stream, keep it down a moment, start it again."""
    run.at_fraction(0.3)
    down_s = 1.0 if run.opts.short else 3.0
    run.redis.crash()
    run.faults.note(f"redis killed (aof={run.redis.aof})")
    time.sleep(down_s)
    run.redis.start()
    run.faults.end = time.time()
    run.faults.note(f"redis back after {down_s} s")


def stop_postgres(run: Run) -> None:
    """`pg_ctl stop -m fast` mid-stream, PostgreSQL down for 20 s (5 s short), start again."""
    run.at_fraction(0.3)
    down_s = 5.0 if run.opts.short else 20.0
    run.pg.stop("fast")
    run.faults.note("postgresql stopped (fast)")
    time.sleep(down_s)
    run.pg.start()
    run.faults.end = time.time()
    run.faults.note(f"postgresql back after {down_s} s")


def _no_setup(stack: Stack) -> AbstractContextManager[object]:
    return nullcontext()


@dataclass(frozen=True)
class Scenario:
    """One fault. `redis` makes the scenario's broker (a RedisServer or a subclass that
    stands for a set of servers, such as a Sentinel-watched pair); `setup` is entered after
    the stack is made and before the store is migrated and the workers start (a mount for
    the audit file, a gateway), and left after the checks."""

    name: str
    inject: Injector
    aof: bool = False
    redis: Callable[[bool], RedisServer] = field(default=RedisServer)
    setup: Callable[[Stack], AbstractContextManager[object]] = field(default=_no_setup)


SCENARIOS = {
    s.name: s
    for s in (
        Scenario("pool-kill", kill_pool_processes),
        Scenario("worker-kill", kill_worker_main),
        Scenario("redis-volatile", restart_redis),
        Scenario("redis-aof", restart_redis, aof=True),
        Scenario("pg-stop", stop_postgres),
        Scenario("audit-disk-full", fill_audit_disk, setup=audit_on_tmpfs),
        Scenario("sentinel-failover", fail_over, redis=sentinel_set),
        Scenario("gateway-kill", kill_gateway, setup=gateway_setup),
        Scenario("pg-restart", restart_postgres),
        Scenario("child-kill", kill_children),
        Scenario("worker-stop", stop_worker),
        Scenario("broker-tamper", tamper_broker),
        Scenario("clock-ahead", clock_ahead),
    )
}


def run_scenario(scenario: Scenario, opts: Options, deadline: float) -> Report:
    """Fresh servers and workers, the stream with the fault, the checks; all torn down."""
    report = Report(scenario.name)
    t0 = time.monotonic()
    faults = Faults()
    with scenario.redis(scenario.aof) as rds, PgCluster() as pg:
        stack = Stack(rds.url, pg.url)
        engine: sa.Engine | None = None
        try:
            with scenario.setup(stack):
                stack.upgrade()
                for _ in range(WORKERS):
                    stack.start_worker()
                engine = make_engine(pg.url)
                with stack.producer() as producer:
                    stream = Stream(
                        producer,
                        stack.markers,
                        opts.commands,
                        opts.rate_per_s,
                        deadline,
                        opts.seed,
                        canary=stack.canary,
                    )
                    run = Run(opts, stack, rds, pg, stream, faults, random.Random(opts.seed))  # noqa: S311 - reproducible faults
                    _stream_with_fault(scenario, run, report, engine, deadline)
                stack.stop_live()
                check_leaks(report, stack, rds)
                check_audit(report, stack)
                check_canary(report, stack, rds, pg)
        finally:
            if engine is not None:
                engine.dispose()
            stack.close()
    report.faults = faults.events
    report.problems.extend(faults.problems)
    report.duration_s = round(time.monotonic() - t0, 1)
    return report


def _stream_with_fault(
    scenario: Scenario, run: Run, report: Report, engine: sa.Engine, deadline: float
) -> None:
    stream = run.stream
    stream.start()
    scenario.inject(run)
    if not stream.join(max(0.0, deadline - time.monotonic())):
        report.problems.append("timeout: the stream was still submitting")
    settle_by = min(deadline, time.monotonic() + run.opts.settle_s)
    left = wait_settled(engine, settle_by)
    if left:
        report.problems.append(f"timeout: {left} command(s) still unsettled")
    report.submit_errors = dict(stream.errors)
    if stream.given_up:
        report.problems.append(f"submit gave up on {len(stream.given_up)} command(s)")
    check_commands(report, engine, stream.accepted, run.stack.markers, run.faults)
