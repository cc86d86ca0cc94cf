"""Prometheus metrics and `/healthz` of a worker, correct across its prefork pool processes.

prometheus-client's multiprocess mode: every process writes its samples to files in one
private directory (`PROMETHEUS_MULTIPROC_DIR`, set by `prepare` before the client is first
imported), and the worker's main process serves the sum on `--metrics-port`. Labels are
low-cardinality only: tenant, state, kind, outcome — never command ids or argv.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

log = logging.getLogger("execq.metrics")

DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 3600)


def prepare() -> str:
    """A fresh sample directory for this worker (call before prometheus_client is imported)."""
    path = tempfile.mkdtemp(prefix="execq-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
    return path


@dataclass(frozen=True)
class Metrics:
    """The worker's metrics (created once per process, after `prepare`)."""

    commands: Any
    duration: Any
    queue_wait: Any
    running: Any
    limit_kills: Any
    rollbacks: Any
    audit_held: Any
    audit_dropped: Any

    def audit_file(self, tenant: str, backlog: tuple[int, int]) -> None:
        """Record a trail's backlog (`Trail.backlog`): held events, newly dropped ones."""
        held, dropped = backlog
        self.audit_held.labels(tenant).set(held)
        if dropped:
            self.audit_dropped.labels(tenant).inc(dropped)


@cache
def metrics() -> Metrics:
    """This process's metric objects."""
    from prometheus_client import Counter, Gauge, Histogram  # noqa: PLC0415

    return Metrics(
        commands=Counter(
            "execq_commands_total", "Commands that ended, by final state.", ["tenant", "state"]
        ),
        duration=Histogram(
            "execq_command_duration_seconds",
            "Wall-clock time from start to end of a command.",
            ["tenant"],
            buckets=DURATION_BUCKETS,
        ),
        queue_wait=Histogram(
            "execq_queue_wait_seconds",
            "Time from publish to claim by a worker.",
            ["tenant"],
            buckets=DURATION_BUCKETS,
        ),
        running=Gauge(
            "execq_running", "Commands running now.", ["tenant"], multiprocess_mode="livesum"
        ),
        limit_kills=Counter(
            "execq_limit_kills_total", "Commands killed by a limit, by kind.", ["tenant", "kind"]
        ),
        rollbacks=Counter(
            "execq_rollbacks_total", "Compensating rollbacks, by outcome.", ["tenant", "outcome"]
        ),
        audit_held=Gauge(
            "execq_audit_file_held_events",
            "Audit events the store has that the audit file could not take yet (its disk is "
            "full): held in memory, appended once it can. 0 normally.",
            ["tenant"],
            multiprocess_mode="livesum",
        ),
        audit_dropped=Counter(
            "execq_audit_file_dropped_events_total",
            "Audit events never written to the audit file: more than a process may hold while "
            "its disk was full (the store has them).",
            ["tenant"],
        ),
    )


@dataclass
class Health:
    """What `/healthz` checks: each callable raises when its dependency is unusable."""

    checks: dict[str, Callable[[], None]]

    def report(self) -> tuple[int, dict[str, Any]]:
        """(HTTP status, JSON body): 200 when every check passes, else 503."""
        results: dict[str, Any] = {}
        for name, check in self.checks.items():
            try:
                check()
                results[name] = {"ok": True}
            except Exception as exc:
                results[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:300]}
        ok = all(r["ok"] for r in results.values())
        return (200 if ok else 503), {"status": "ok" if ok else "unavailable", "checks": results}


class MetricsServer:
    """`/metrics` (every process's samples, plus queue depth) and `/healthz`, in a thread."""

    def __init__(
        self,
        port: int,
        health: Health,
        queue_depth: Callable[[], Iterator[tuple[str, float]]],
        needs_attention: Callable[[], Iterator[tuple[str, float]]] | None = None,
    ) -> None:
        from prometheus_client import CollectorRegistry, generate_latest  # noqa: PLC0415
        from prometheus_client.core import GaugeMetricFamily  # noqa: PLC0415
        from prometheus_client.multiprocess import MultiProcessCollector  # noqa: PLC0415

        registry = CollectorRegistry()
        MultiProcessCollector(registry)  # type: ignore[no-untyped-call]

        class QueueDepth:
            def collect(self) -> Iterator[Any]:
                family = GaugeMetricFamily(
                    "execq_queue_depth", "Messages waiting in the queue.", labels=["tenant"]
                )
                for tenant, depth in queue_depth():
                    family.add_metric([tenant], depth)
                yield family
                if needs_attention is not None:
                    attention = GaugeMetricFamily(
                        "execq_needs_attention",
                        "Commands whose compensation failed, waiting for a person.",
                        labels=["tenant"],
                    )
                    for tenant, count in needs_attention():
                        attention.add_metric([tenant], count)
                    yield attention

        registry.register(QueueDepth())

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.split("?")[0] == "/metrics":
                    self._send(200, generate_latest(registry), "text/plain; version=0.0.4")
                elif self.path.split("?")[0] == "/healthz":
                    status, body = health.report()
                    self._send(status, json.dumps(body).encode(), "application/json")
                else:
                    self._send(404, b'{"error": "try /metrics or /healthz"}', "application/json")

            def _send(self, status: int, body: bytes, content_type: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_: Any) -> None:
                pass  # scrapes every few seconds would drown the worker's log

        self.server = ThreadingHTTPServer(("0.0.0.0", port), Handler)  # noqa: S104
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(
            target=self.server.serve_forever, name="execq-metrics", daemon=True
        )

    def start(self) -> None:
        """Serve until stop()."""
        self._thread.start()

    def stop(self) -> None:
        """Stop serving."""
        self.server.shutdown()
        self.server.server_close()


def process_exited(pid: int) -> None:
    """Drop a pool process's live gauges (its counters stay in the sum)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess  # noqa: PLC0415

        multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]


def cleanup() -> None:
    """Remove this worker's sample directory (at worker exit)."""
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if path and os.path.basename(path).startswith("execq-metrics-"):
        shutil.rmtree(path, ignore_errors=True)
