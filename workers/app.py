"""The execq worker: a Celery worker consuming exactly one tenant's queue with its pool size."""

from __future__ import annotations

import logging

import billiard.pool
from celery import Celery

from producer.broker import make_celery
from workers import signals, tasks
from workers.runtime import Runtime, WorkerConfig
from workers.sandbox import detect_capabilities, sweep_stale
from workers.sandbox.cgroup import migrations_favored

log = logging.getLogger("execq.worker")


# How long (s) a pool process that is stopping waits for the main process to read its last
# results. billiard waits up to 30 s; a warm shutdown stops reading them, so a pool process
# that finished a command just then kept the worker up 30 s past SIGTERM (found by `make
# chaos`, broker-tamper: 1 shutdown in 3). Nothing is lost by not waiting: results are
# ignored, the message was acked when the command started, and the outcome is in the store.
RESULTS_WAIT_S = 2.0


def bound_results_wait() -> None:
    """Set billiard's wait before the pool forks (its processes read the module's value)."""
    interval = billiard.pool.GUARANTEE_MESSAGE_CONSUMPTION_RETRY_INTERVAL
    billiard.pool.GUARANTEE_MESSAGE_CONSUMPTION_RETRY_LIMIT = max(1, int(RESULTS_WAIT_S / interval))


def build(config: WorkerConfig) -> tuple[Celery, Runtime]:
    """The Celery app with `execq.run` registered, and the runtime its processes share."""
    app = make_celery(config.settings, config.tenants, broker_url=config.broker_url)
    runtime = Runtime(config)
    tasks.register(app, lambda: runtime)
    return app, runtime


def run_worker(config: WorkerConfig, *, loglevel: str = "INFO") -> int:
    """Run the worker in this process until SIGTERM (warm shutdown) or SIGINT; its exit code."""
    capabilities = detect_capabilities()
    line = capabilities.summary()
    log.info("sandbox on this host: %s", line)
    if (capabilities.memory_v1 or capabilities.pids_v1 or capabilities.cgroup_v2) and not (
        migrations_favored()
    ):
        log.info(
            "cgroup moves wait for an RCU grace period on this host (up to ~15 ms per command "
            "when the worker is not busy): mount a cgroup hierarchy with favordynmods, see "
            "docs/deployment.md#host-tuning"
        )
    # Commands of a worker that was SIGKILLed may still run in their cgroups: end them now.
    swept = sweep_stale(capabilities)
    if swept:
        log.warning("killed and removed %d stale sandbox cgroup(s): %s", len(swept), swept)
    bound_results_wait()
    app, runtime = build(config)
    signals.connect(runtime, capabilities_line=line)
    worker = app.Worker(
        hostname=config.hostname,
        queues=[config.tenant.queue],
        concurrency=config.concurrency,
        pool="prefork",
        loglevel=loglevel,
        # Mingle and gossip sync in-memory state between workers; the store is our state.
        without_mingle=True,
        without_gossip=True,
        optimization="fair",
    )
    worker.start()
    return int(worker.exitcode or 0)
