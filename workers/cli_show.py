"""What several `execq` subcommands share: opening a producer and showing a record."""

from __future__ import annotations

import json
import shlex
from typing import Any

from rich.markup import escape
from rich.table import Table

from producer.record import CommandRecord
from producer.settings import Settings, load_settings
from producer.states import State
from producer.tenants import TenantsFile, load_tenants
from workers.clikit import out


def load() -> tuple[Settings, TenantsFile]:
    settings = load_settings()
    return settings, load_tenants(settings.tenants_file)


def open_producer() -> Any:
    from producer import telemetry  # noqa: PLC0415
    from producer.client import Producer  # noqa: PLC0415  (keeps `--help` fast)

    settings, tenants = load()
    telemetry.configure(
        service_name="execq-cli", attributes={"deployment.environment": settings.env.value}
    )
    return Producer.from_settings(settings, tenants)


STATE_STYLE = {
    State.SUCCEEDED: "green",
    State.FAILED: "red",
    State.REJECTED: "magenta",
    State.REVOKED: "yellow",
    State.RUNNING: "cyan",
    State.PENDING: "blue",
    State.REVERTED: "green",
    State.REVERT_FAILED: "bold red",
    State.REVERTING: "cyan",
}


def print_record(rec: CommandRecord, as_json: bool) -> None:
    if as_json:
        print(json.dumps(rec.to_json(), default=str))
        return
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    style = STATE_STYLE.get(rec.state, "")
    table.add_row("id", rec.id)
    table.add_row("tenant", rec.tenant)
    if rec.action is not None:
        params = " ".join(f"{k}={v}" for k, v in (rec.params or {}).items())
        table.add_row("action", escape(f"{rec.action} {params}".strip()))
    # Escaped: an argument such as `[red]` is the caller's text, not Rich markup.
    table.add_row("argv", escape(shlex.join(rec.argv)))
    table.add_row("state", f"[{style}]{rec.state}[/]")
    for name in (
        "exit_code",
        "failure_reason",
        "error",
        "attempts",
        "version",
        "trace_id",
        "worker",
        "created_at",
        "started_at",
        "finished_at",
    ):
        value = getattr(rec, name)
        if value is not None:
            table.add_row(name, str(value))
    if rec.enforced:
        table.add_row("enforced", ", ".join(f"{k}={v}" for k, v in rec.enforced.items()))
    if rec.retry_at is not None:
        table.add_row(
            "retry_at", f"{rec.retry_at} (automatic retry, max_retries {rec.max_retries})"
        )
    if rec.batch_id is not None:
        table.add_row("batch", f"{rec.batch_id} step {rec.batch_step}")
    if rec.compensate:
        table.add_row("compensate", shlex.join(rec.compensate))
    if rec.snapshot_paths:
        table.add_row("snapshot", ", ".join(rec.snapshot_paths))
    if rec.needs_attention:
        table.add_row("attention", "[bold red]needs attention[/]: its compensation failed")
    out.print(table)
    comp = rec.compensation
    if comp:
        out.print(
            f"[bold]compensation[/] #{comp.get('attempt', '?')}: {comp.get('state')}"
            + (f" ({comp['failure_reason']})" if comp.get("failure_reason") else "")
            + (f", exit {comp['exit_code']}" if comp.get("exit_code") is not None else "")
            + (f", asked by {comp['requested_by']}" if comp.get("requested_by") else ""),
            highlight=False,
        )
        if comp.get("snapshot"):
            undone = comp["snapshot"]
            out.print(
                f"  snapshot restored: {undone.get('added', 0)} added removed, "
                f"{undone.get('changed', 0)} changed restored, "
                f"{undone.get('removed', 0)} removed brought back",
                highlight=False,
            )
        for label in ("error", "stdout", "stderr"):
            if comp.get(label):
                out.print(f"  {label}: {str(comp[label]).rstrip()}", markup=False, highlight=False)
    for label, text, size in (
        ("stdout", rec.stdout, rec.stdout_bytes),
        ("stderr", rec.stderr, rec.stderr_bytes),
    ):
        if text:
            out.print(f"[bold]{label}[/] ({size} bytes):")
            out.print(text.rstrip("\n"), markup=False, highlight=False)
    for t in rec.transitions:
        out.print(
            f"  {t.at:%H:%M:%S.%f} {t.from_state or '-'} → {t.to_state} by {t.actor}"
            + (f" ({t.reason})" if t.reason else ""),
            markup=False,
            highlight=False,
        )
