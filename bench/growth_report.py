"""The tables and PNG charts of `python -m bench.growth`, from its JSON document."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display on a bench host or in CI

import matplotlib.pyplot as plt  # after use(): the backend is chosen first

Doc = dict[str, Any]


def _grid(header: Sequence[str], rows: list[list[str]]) -> str:
    width = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    lines = [header, *rows]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(x, width, strict=True)).rstrip() for x in lines
    )


def _f(v: float | None, fmt: str = "{:.0f}") -> str:
    return "-" if v is None else fmt.format(v)


def _setup(row: Doc) -> str:
    return f"{row['processes']} x c{row['concurrency']}"


def concurrency_table(rows: list[Doc]) -> str:
    """execq and Celery per setup, with execq's ratio to Celery's same setup."""
    celery = {(r["concurrency"], r["processes"]): r for r in rows if r["system"] == "celery"}
    out = []
    for r in rows:
        base = celery.get((r["concurrency"], r["processes"]), {}).get("e2e_per_s")
        e2e = r["e2e_per_s"]
        span = "" if e2e is None else f" ({r['e2e_min']:.0f}-{r['e2e_max']:.0f})"
        lat = (r[f"paced_p{k}_ms"] for k in (50, 95, 99))
        out.append(
            [
                r["system"],
                _setup(r),
                r["ok"],
                _f(e2e) + span,
                "-" if not (e2e and base) else f"{e2e / base:.2f}x",
                "-" if r["paced_p50_ms"] is None else "/".join(f"{x:.1f}" for x in lat),
            ]
        )
    hdr = ["system", "workers x conc", "ok", "e2e/s (min-max)", "vs celery", "p50/p95/p99 ms paced"]
    return _grid(hdr, out)


def claims_table(rows: list[Doc]) -> str:
    """Claim and finish p50/p99 per (store rows, pending)."""
    out = [
        [
            f"{r['store_rows']:,}",
            f"{r['pending']:,}",
            f"{r['claim_p50_ms']:.2f} / {r['claim_p99_ms']:.2f}",
            f"{r['finish_p50_ms']:.2f} / {r['finish_p99_ms']:.2f}",
        ]
        for r in rows
    ]
    return _grid(["store rows", "pending (tenant)", "claim p50/p99 ms", "finish p50/p99 ms"], out)


def audit_table(rows: list[Doc]) -> str:
    """`audit verify` time per chain length."""
    out = [[f"{r['events']:,}", f"{r['verify_s']:.3f}", f"{r['events_per_s']:,.0f}"] for r in rows]
    return _grid(["events", "verify s", "events/s"], out)


def sweeps_table(rows: list[Doc]) -> str:
    """The reaper's scans and one whole pass per backlog."""
    out = [
        [
            f"{r['backlog']:,}",
            f"{r['expired_leases_ms']:.2f}",
            f"{r['unpublished_ms']:.2f}",
            f"{r['pass_ms']:.0f}",
            f"{r['pass_lost']} / {r['pass_published']}",
        ]
        for r in rows
    ]
    hdr = ["backlog (each)", "expired_leases ms", "unpublished ms", "pass ms", "lost / published"]
    return _grid(hdr, out)


def tables(doc: Doc) -> str:
    """Every section's table that ran, with a title line each."""
    parts = []
    if rows := doc.get("concurrency"):
        parts.append("# throughput (burst) and latency (paced) by workers x concurrency\n")
        parts[-1] += concurrency_table(rows)
    if rows := doc.get("claims"):
        parts.append("# claim and finish latency by store size and pending backlog\n")
        parts[-1] += claims_table(rows)
    if rows := doc.get("audit"):
        parts.append("# audit verify by chain length\n" + audit_table(rows))
    if rows := doc.get("sweeps"):
        rows_in_store = rows[0]["store_rows"]
        parts.append(f"# reaper by backlog (store of {rows_in_store:,} rows)\n")
        parts[-1] += sweeps_table(rows)
    return "\n\n".join(parts)


def _concurrency_chart(rows: list[Doc], path: Path) -> None:
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    setups = list(dict.fromkeys(_setup(r) for r in rows))
    x = range(len(setups))
    for i, system in enumerate(("execq", "celery")):
        by = {_setup(r): r for r in rows if r["system"] == system}
        offset = [k + (i - 0.5) * 0.38 for k in x]
        left.bar(offset, [by[s]["e2e_per_s"] or 0 for s in setups], 0.38, label=system)
        right.bar(offset, [by[s]["paced_p99_ms"] or 0 for s in setups], 0.38, label=system)
    latency = f"p99 latency ms ({rows[0].get('latency_from', 'paced')})"
    for ax, title in ((left, "end-to-end commands/s (burst)"), (right, latency)):
        ax.set_xticks(list(x), setups)
        ax.set_xlabel("worker processes x concurrency")
        ax.set_title(title)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _claims_chart(rows: list[Doc], path: Path) -> None:
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    pendings = sorted({r["pending"] for r in rows})
    for size in sorted({r["store_rows"] for r in rows}):
        by = {r["pending"]: r for r in rows if r["store_rows"] == size}
        for ax, op in ((left, "claim"), (right, "finish")):
            line = ax.plot(
                range(len(pendings)),
                [by[p][f"{op}_p50_ms"] for p in pendings],
                marker="o",
                label=f"{size:,} rows p50",
            )
            ax.plot(
                range(len(pendings)),
                [by[p][f"{op}_p99_ms"] for p in pendings],
                marker="x",
                linestyle="--",
                color=line[0].get_color(),
                label=f"{size:,} rows p99",
            )
    for ax, op in ((left, "claim"), (right, "finish (with 3 audit events)")):
        ax.set_xticks(range(len(pendings)), [f"{p:,}" for p in pendings])
        ax.set_xlabel("pending commands of the tenant")
        ax.set_title(f"{op}, ms")
        ax.set_ylim(bottom=0)
    left.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _audit_chart(rows: list[Doc], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(5.5, 4))
    ax.loglog([r["events"] for r in rows], [r["verify_s"] for r in rows], marker="o")
    ax.set_xlabel("events in the chain")
    ax.set_ylabel("audit verify, s")
    ax.set_title("audit verify (in-process, PostgreSQL)")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _sweeps_chart(rows: list[Doc], path: Path) -> None:
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    x = range(len(rows))
    labels = [f"{r['backlog']:,}" for r in rows]
    left.plot(x, [r["expired_leases_ms"] for r in rows], marker="o", label="expired_leases (100)")
    left.plot(x, [r["unpublished_ms"] for r in rows], marker="o", label="unpublished (500)")
    left.set_title("one scan, ms (p50; limit)")
    left.legend()
    right.bar(x, [r["pass_ms"] for r in rows])
    right.set_title("one whole reaper pass, ms")
    for ax in (left, right):
        ax.set_xticks(list(x), labels)
        ax.set_xlabel("expired leases and unpublished commands (each)")
        ax.set_ylim(bottom=0)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


CHARTS = {
    "concurrency": ("growth-concurrency.png", _concurrency_chart),
    "claims": ("growth-claim-latency.png", _claims_chart),
    "audit": ("growth-audit-verify.png", _audit_chart),
    "sweeps": ("growth-sweeps.png", _sweeps_chart),
}


def charts(doc: Doc, directory: Path) -> list[Path]:
    """One PNG per section that ran, into `directory`; their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for section, (name, draw) in CHARTS.items():
        if rows := doc.get(section):
            draw(rows, directory / name)
            written.append(directory / name)
    return written
