"""The soak's charts: one PNG per group of metrics, each panel with its samples, the warm-up
shaded and the least-squares line fitted after it (what the verdict judged)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display on a CI host

import matplotlib.pyplot as plt  # after use(): the backend is chosen first

from chaos.soak_report import after, fit

Sample = dict[str, Any]
# file name -> panels, each (title, [(key, legend)])
CHARTS: dict[str, list[tuple[str, list[tuple[str, str]]]]] = {
    "soak-memory": [
        ("worker RSS (MB)", [("worker_rss_mb", "main + pool, summed")]),
        ("largest worker process RSS (MB)", [("worker_rss_max_mb", "largest")]),
        ("submitting process RSS (MB)", [("producer_rss_mb", "producer")]),
        ("Redis used_memory (MB)", [("redis_used_mb", "used_memory")]),
    ],
    "soak-handles": [
        ("worker open fds", [("worker_fds", "summed"), ("worker_fds_max", "largest")]),
        ("worker threads", [("worker_threads", "summed"), ("worker_threads_max", "largest")]),
        ("submitting process", [("producer_fds", "fds"), ("producer_threads", "threads")]),
        ("Redis", [("redis_clients", "clients"), ("redis_other_keys", "keys but live output")]),
    ],
    "soak-dirs": [
        ("private directories (workdir root)", [("workdir_entries", "entries")]),
        ("workers' TMPDIR", [("tmp_entries", "entries")]),
        ("execq-<pid> cgroups", [("cgroups", "cgroups")]),
        ("host load average, 1 min (other work slows every figure)", [("host_load1", "load")]),
    ],
    "soak-store": [
        ("store rows", [("commands", "commands"), ("batches", "batches")]),
        ("history rows", [("transitions", "transitions"), ("audit_events", "audit events")]),
        ("store size (MB)", [("store_mb", "pg_database_size")]),
        ("backlog (commands)", [("unsettled", "pending + running + reverting")]),
    ],
}


def _panel(ax: Any, samples: list[Sample], title: str, series: list[tuple[str, str]]) -> None:
    minutes = [s["t"] / 60 for s in samples]
    for key, legend in series:
        ys = [s.get(key) for s in samples]
        ax.plot(minutes, ys, marker=".", markersize=3, linewidth=1, label=legend)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("minutes", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")


def _fitted(ax: Any, window: list[Sample], key: str) -> None:
    pts = [(s["t"], float(s[key])) for s in window if s.get(key) is not None]
    if len(pts) < 3:
        return
    a, b = fit([p[0] for p in pts], [p[1] for p in pts])
    ends = (pts[0][0], pts[-1][0])
    ax.plot([t / 60 for t in ends], [a + b * t for t in ends], "k--", linewidth=1)


def draw(samples: list[Sample], warmup_s: float, out_dir: Path, title: str) -> list[Path]:
    """Write every chart of CHARTS into out_dir; the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    window = after(samples, warmup_s)
    load_end = max((s["t"] for s in samples if s.get("phase") == "load"), default=0.0)
    written = []
    for name, panels in CHARTS.items():
        fig, axes = plt.subplots(2, 2, figsize=(10, 6.5))
        for ax, (panel_title, series) in zip(axes.flat, panels, strict=True):
            _panel(ax, samples, panel_title, series)
            ax.axvspan(0, warmup_s / 60, color="0.85", zorder=0)  # the warm-up, not judged
            if load_end < samples[-1]["t"]:
                ax.axvline(load_end / 60, color="0.5", linewidth=0.8)  # submitting stopped
            for key, _ in series:
                _fitted(ax, window, key)
        fig.suptitle(title, fontsize=10)
        fig.tight_layout()
        path = out_dir / f"{name}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written
