"""The only module that touches Celery signals: per-process setup, readiness, the reaper."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from celery import signals

from producer import logs
from producer.broker import queue_key
from producer.tenants import Tenant
from workers import metrics, remote
from workers.pipeline import workdir_root
from workers.reaper import Reaper
from workers.runtime import Runtime
from workers.sandbox import detect_capabilities, sweep_stale
from workers.sandbox.procfs import is_alive
from workers.sandbox.workdir import sweep_stale_dirs

log = logging.getLogger("execq.worker")


def filesystem_line(tenant: Tenant) -> str:
    """What the ready line says of the tenant's filesystem view ('' when it asks for none)."""
    if tenant.filesystem is None:
        return ""
    caps = detect_capabilities()
    if caps.bwrap is not None:
        return f"filesystem view: bubblewrap (private /tmp {tenant.filesystem.tmp_mb} MB); "
    # Only an optional view gets here: a required one stopped the worker before it started.
    return f"filesystem view: HOST ({caps.bwrap_problem}); "


def _host_sweep(root: Path) -> Callable[[], None]:
    """What the reaper runs after each pass: the leftovers of dead pool processes."""
    caps = detect_capabilities()

    def sweep() -> None:
        sweep_stale(caps)
        sweep_stale_dirs(root, is_alive)

    return sweep


def connect(runtime: Runtime, *, capabilities_line: str) -> None:
    """Wire a worker's lifecycle to `runtime` (call once, before the worker starts)."""
    remote.install(runtime)
    state: dict[str, Any] = {}

    @signals.setup_logging.connect(weak=False)  # type: ignore[untyped-decorator]
    def _setup_logging(loglevel: int | str | None = None, **_: Any) -> None:
        # Any receiver here keeps Celery from installing its own handlers and formats; the
        # pool processes are forked after this and inherit the handler.
        if not logs.is_configured():
            logs.configure(level=str(loglevel or "INFO"))

    @signals.worker_process_init.connect(weak=False)  # type: ignore[untyped-decorator]
    def _process_init(**_: Any) -> None:
        runtime.after_fork()

    @signals.worker_process_shutdown.connect(weak=False)  # type: ignore[untyped-decorator]
    def _process_shutdown(pid: int | None = None, **_: Any) -> None:
        runtime.close()
        metrics.process_exited(pid or os.getpid())

    @signals.worker_ready.connect(weak=False)  # type: ignore[untyped-decorator]
    def _ready(**_: Any) -> None:
        cfg = runtime.config
        reaper = Reaper(
            settings=cfg.settings,
            tenant=cfg.tenant,
            store=runtime.store,
            publisher=runtime.publisher,
            redis_url=cfg.broker_url,
            actor=f"reaper:{runtime.worker_id}",
            host_sweep=_host_sweep(workdir_root(cfg.settings)),
        )
        reaper.start()
        state["reaper"] = reaper
        if cfg.metrics_port is not None:
            server = metrics.MetricsServer(
                cfg.metrics_port, runtime.health(), runtime.queue_depth, runtime.needs_attention
            )
            server.start()
            state["metrics"] = server
            log.info("metrics and health on port %d (/metrics, /healthz)", server.port)
        # Scripts (and `execq up`) wait for this line.
        print(
            f"execq worker for tenant {cfg.tenant.name!r} ready: queue {cfg.tenant.queue} "
            f"(Redis list {queue_key(cfg.settings, cfg.tenant)}), "
            f"concurrency {cfg.concurrency}; signed messages: "
            f"{'required' if cfg.signer else 'OFF (no EXECQ_SIGNING_KEY)'}; "
            f"{filesystem_line(cfg.tenant)}enforced: {capabilities_line}",
            flush=True,
        )
        sys.stdout.flush()

    @signals.worker_shutdown.connect(weak=False)  # type: ignore[untyped-decorator]
    def _shutdown(**_: Any) -> None:
        reaper = state.pop("reaper", None)
        if reaper is not None:
            reaper.stop()
        server = state.pop("metrics", None)
        if server is not None:
            server.stop()
        metrics.cleanup()
        runtime.close()
        log.info("execq worker for tenant %r stopped", runtime.config.tenant.name)
