"""The soak's verdicts: a least-squares slope per sampled metric after the warm-up, judged
against a tolerance, store rows per command, a Markdown table to paste into docs/soak.md."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

Sample = dict[str, Any]


@dataclass(frozen=True)
class Metric:
    """A sampled value that must stay flat: its fitted change over the window after the
    warm-up may be at most max(abs_tol, rel_tol * its mean) upwards."""

    key: str
    label: str
    unit: str
    abs_tol: float
    rel_tol: float = 0.0
    leak: bool = True  # growing is a defect; False: growing is explained by the backlog


FLAT = (
    Metric("worker_rss_mb", "worker RSS, main + pool, summed", "MB", 20, 0.10),
    Metric("worker_rss_max_mb", "worker RSS, largest process", "MB", 10, 0.10),
    Metric("worker_fds", "worker open fds, summed", "fds", 4, 0.05),
    Metric("worker_threads", "worker threads, summed", "threads", 2, 0.05),
    Metric("producer_rss_mb", "submitting process RSS", "MB", 10, 0.10),
    Metric("producer_fds", "submitting process open fds", "fds", 4),
    Metric("producer_threads", "submitting process threads", "threads", 2),
    Metric("workdir_entries", "private directories in the workdir root", "entries", 2),
    Metric("tmp_entries", "entries in the workers' TMPDIR", "entries", 2),
    Metric("cgroups", "execq-<pid> cgroups", "cgroups", 2),
    Metric("redis_clients", "Redis connected clients", "clients", 2),
    Metric("redis_other_keys", "Redis keys other than live output", "keys", 20, 0.10),
    Metric("redis_used_mb", "Redis used_memory", "MB", 2, 0.10, leak=False),
    Metric("live_streams", "live-output streams (kept 1 h)", "streams", 20, leak=False),
)
# judged first: whether the workers kept up explains the Redis figures
BACKLOG = Metric("unsettled", "backlog: pending + running + reverting", "commands", 50, leak=False)
ROWS = ("transitions", "audit_events", "batches")


def fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least squares y = a + b x: (a, b); (mean, 0) when x does not vary."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return my, 0.0
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
    return my - b * mx, b


def after(samples: list[Sample], warmup_s: float) -> list[Sample]:
    return [s for s in samples if s["t"] >= warmup_s and s.get("phase") == "load"]


def _slope(window: list[Sample], m: Metric, span: float) -> dict[str, Any] | None:
    xs = [s["t"] for s in window if s.get(m.key) is not None]
    ys = [float(s[m.key]) for s in window if s.get(m.key) is not None]
    if len(xs) < 3:
        return None
    _, b = fit(xs, ys)
    mean = sum(ys) / len(ys)
    change, tol = b * span, max(m.abs_tol, m.rel_tol * abs(mean))
    verdict = "growing" if change > tol else "falling" if change < -tol else "flat"
    return {
        "label": m.label,
        "unit": m.unit,
        "first": ys[0],
        "last": ys[-1],
        "mean": round(mean, 2),
        "per_hour": round(b * 3600, 2),
        "change": round(change, 2),
        "tolerance": round(tol, 2),
        "verdict": verdict,
        "leak": m.leak,
    }


def judge(samples: list[Sample], warmup_s: float) -> dict[str, Any]:
    """Per metric: slope per hour, fitted change over the window, tolerance, verdict."""
    window = after(samples, warmup_s)
    out: dict[str, Any] = {"window_s": 0.0, "samples": len(window), "metrics": {}}
    if len(window) < 3:
        out["error"] = f"only {len(window)} sample(s) after the warm-up: no slopes"
        return out
    span = window[-1]["t"] - window[0]["t"]
    out["window_s"] = round(span, 1)
    found: dict[str, dict[str, Any]] = {}
    for m in (BACKLOG, *FLAT):
        if (judged := _slope(window, m, span)) is not None:
            found[m.key] = judged
    out["metrics"] = found
    grows = {k for k, v in found.items() if v["verdict"] == "growing"}
    out["kept_up"] = "unsettled" not in grows
    # growth that is by design, explained rather than flagged
    if "live_streams" in grows:
        found["live_streams"]["verdict"] = "grows: each kept 1 h"
    if "redis_used_mb" in grows and ({"live_streams", "unsettled"} & grows):
        why = "live output" if "live_streams" in grows else "the backlog"
        found["redis_used_mb"]["verdict"] = f"grows with {why}"
    if {"redis_used_mb", "live_streams"} <= found.keys():
        streams = found["live_streams"]["per_hour"]
        mb = found["redis_used_mb"]["per_hour"]
        out["redis_kb_per_stream"] = round(mb * 1024 / streams, 2) if streams > 0 else None
    out["rows"] = rows_per_command(window, samples[-1])
    return out


def rows_per_command(window: list[Sample], settled: Sample) -> dict[str, Any]:
    """Rows per command over the whole run (once settled, every command wrote all of its
    rows), and per finished command in each half of the window after the warm-up: a store
    that grows linearly with commands has about the same ratio in both."""
    mid = len(window) // 2

    def ratio(a: Sample, b: Sample, key: str) -> float | None:
        done = (b["commands"] - b["unsettled"]) - (a["commands"] - a["unsettled"])
        return None if done <= 0 else round((b[key] - a[key]) / done, 3)

    out: dict[str, Any] = {}
    commands = max(1, settled["commands"])
    for key in ROWS:
        halves = (ratio(window[0], window[mid], key), ratio(window[mid], window[-1], key))
        linear = None not in halves and abs(halves[0] - halves[1]) <= 0.15 * max(halves)  # type: ignore[operator, type-var]
        out[key] = {
            "per_command": round(settled[key] / commands, 3),
            "halves": halves,
            "linear": bool(linear),
        }
    out["store_kb_per_command"] = round(settled["store_mb"] * 1024 / commands, 2)
    return out


def finished_rate(samples: list[Sample]) -> float:
    """Commands that reached a terminal state per second while the load ran."""
    load = [s for s in samples if s.get("phase") == "load"]
    if len(load) < 2 or load[-1]["t"] <= load[0]["t"]:
        return 0.0
    done = [int(s["commands"]) - int(s["unsettled"]) for s in (load[0], load[-1])]
    return round((done[1] - done[0]) / float(load[-1]["t"] - load[0]["t"]), 1)


def problems(verdicts: dict[str, Any]) -> list[str]:
    """Leak-type metrics that grew, and Redis memory that grew while the queue kept up."""
    found = [verdicts["error"]] if "error" in verdicts else []
    for key, m in verdicts.get("metrics", {}).items():
        if m["verdict"] == "growing" and key != "unsettled":
            found.append(
                f"{key} grew {m['change']:+g} {m['unit']} after the warm-up "
                f"(tolerance {m['tolerance']:g}; {m['per_hour']:+g} {m['unit']}/h)"
            )
    return found


def markdown(result: dict[str, Any]) -> str:
    """The figures section of docs/soak.md, ready to paste."""
    v, o = result["verdicts"], result["outcomes"]
    lines = [
        f"{result['minutes']:g} minutes asked at {result['rate']:g} submissions/s; "
        f"{result['achieved_rate']:g}/s achieved ({result['submitted']} submissions, "
        f"{o['commands']} commands); warm-up {result['warmup_s']:g} s, "
        f"{v['samples']} samples after it over {v['window_s']:g} s.",
        "",
        "| metric | after warm-up | end | per hour | change in window | tolerance | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    for key, m in v.get("metrics", {}).items():
        lines.append(
            f"| {m['label']} (`{key}`) | {m['first']:.4g} {m['unit']} | {m['last']:.4g} | "
            f"{m['per_hour']:+.4g} | {m['change']:+.4g} | {m['tolerance']:.3g} | {m['verdict']} |"
        )
    rows = v.get("rows", {})
    per = ", ".join(
        f"{k} {rows[k]['per_command']}" + ("" if rows[k]["linear"] else " (not linear)")
        for k in ROWS
        if k in rows
    )
    backlog = v.get("metrics", {}).get("unsettled", {})
    kept = (
        "kept up" if v.get("kept_up") else f"fell behind ({backlog.get('change', 0):+.0f} commands)"
    )
    lines += [
        "",
        f"Workers {kept}; finished {result['finished_rate']:g} commands/s during the load, "
        f"drained in {result.get('drain_s', '-')} s after it; host load average "
        f"{result.get('host_load1', '-')} (mean of the 1-minute figure).",
        f"Store rows per command: {per}; {rows.get('store_kb_per_command')} kB each.",
        f"Redis: {v.get('redis_kb_per_stream')} kB of used_memory per live-output stream"
        + ("." if v.get("kept_up") else " (the growing backlog's messages included)."),
        "",
    ]
    lines += ["| kind | outcomes |", "|---|---|"]
    for kind, seen in o["by_kind"].items():
        lines.append(f"| {kind} | " + ", ".join(f"{n} {what}" for what, n in seen.items()) + " |")
    return "\n".join(lines)
