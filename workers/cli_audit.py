"""`execq audit …`: verify, checkpoint, export, show and prune the keyed audit trail."""

from __future__ import annotations

import json
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from producer.audit.verify import Problem, Report
from producer.errors import AmbiguousId, NotFound
from producer.keys import load_audit_keys
from producer.settings import load_settings
from workers.clikit import JsonOpt, fail, handled, out

audit_app = typer.Typer(
    help=(
        "The audit trail: one event per phase and operator action, in chains keyed with "
        "EXECQ_AUDIT_KEY.\n\n"
        "The store keeps one chain per tenant; EXECQ_AUDIT_LOG (a JSON-lines file, rotated "
        "by size) keeps its own chain. Signed checkpoints of each chain's head go to "
        "EXECQ_AUDIT_WITNESS. `verify` exits 1 and names the first event that was edited, "
        "deleted, inserted or reordered, and a chain cut short of its last checkpoint."
    ),
    no_args_is_help=True,
)

WitnessOpt = Annotated[
    Path | None,
    typer.Option(
        "--witness",
        help="The checkpoints to check against (default: EXECQ_AUDIT_WITNESS), e.g. a copy "
        "fetched from where the witness is shipped.",
    ),
]


def _store() -> Any:
    from producer.store.db import make_engine, require_schema  # noqa: PLC0415
    from producer.store.repository import Store  # noqa: PLC0415

    engine = make_engine(load_settings().database_url)
    require_schema(engine)
    return Store(engine)


def _command_id(store: Any, given: str) -> str:
    """The full id of the command `given` (an id or a unique prefix) names; else `given` as it
    is, since events also name API tokens by their ids."""
    try:
        return str(store.resolve_id(given))
    except AmbiguousId:
        raise
    except NotFound:
        return given


def _when(value: str | None, option: str) -> datetime | None:
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise typer.BadParameter(
            f"{value!r} is not an ISO 8601 time (e.g. 2026-11-01 or 2026-11-01T12:00:00Z)",
            param_hint=option,
        ) from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _witness(path: Path | None) -> Path:
    return path if path is not None else load_audit_keys().audit_witness


def _print_report(report: Report, elapsed_s: float, as_json: bool) -> None:
    if as_json:
        print(json.dumps({**report.to_json(), "elapsed_s": round(elapsed_s, 3)}))
        return
    table = Table(title=f"audit chains in {report.source}", title_justify="left")
    for col in ("chain", "seq", "events", "starts at", "checkpoint", "last hash"):
        table.add_column(col)
    for name, c in sorted(report.chains.items()):
        start = "genesis" if c.anchor is None else f"anchor {c.anchor[:12]}…"
        checkpoint = "-" if c.checkpoint is None else f"seq {c.checkpoint}"
        table.add_row(
            name,
            f"{c.first_seq}..{c.last_seq}",
            str(c.events),
            start,
            checkpoint,
            c.last_hash[:16] + "…",
        )
    if report.chains:
        out.print(table)
    for warning in report.warnings:
        out.print(f"[yellow]note:[/] {warning}", highlight=False)
    rate = report.events / elapsed_s if elapsed_s > 0 else 0.0
    if report.problem is None:
        out.print(
            f"[green]intact:[/] {report.events} events in {len(report.chains)} chains "
            f"verified in {elapsed_s:.2f} s ({rate:,.0f} events/s)"
        )
    else:
        label = "INCOMPLETE" if report.problem.message.startswith(MISSES) else "TAMPERED"
        out.print(
            f"[bold red]{label}:[/] {report.problem}\n"
            f"({report.events} events before it were intact)",
            highlight=False,
        )


MISSES = "the file misses"


def _short_of_store(file: Path) -> Problem | None:
    """What `--complete` reports: the store's events the file misses, or None."""
    from producer.audit.jsonl import missing_from_file  # noqa: PLC0415

    store = _store()
    missing = missing_from_file(file, lambda since_ns: store.audit.events(since_ns=since_ns))
    if not missing:
        return None
    first = missing[0]
    began = datetime.fromtimestamp(first.exec_time_ns / 1e9, UTC).isoformat(timespec="seconds")
    return Problem(
        str(file),
        f"{MISSES} {len(missing)} event(s) the store has, the first of tenant "
        f"{first.tenant!r} from {began} (the store's chain {first.chain!r} seq {first.seq}): "
        f"`execq audit export --since {began}` writes them out",
        first.chain,
        first.seq,
        first.event_id,
    )


@audit_app.command("verify")
@handled
def verify_cmd(
    file: Annotated[
        Path | None,
        typer.Option(
            "--file",
            help="Verify this JSON-lines file (and its rotated predecessors) instead of the store.",
        ),
    ] = None,
    tenant: Annotated[
        str | None, typer.Option("--tenant", "-t", help="Only this tenant's chain (store only).")
    ] = None,
    anchored: Annotated[
        bool,
        typer.Option(
            "--anchored",
            help="Accept chains that start mid-way (e.g. an export made with --since).",
        ),
    ] = False,
    witness: WitnessOpt = None,
    complete: Annotated[
        bool,
        typer.Option(
            "--complete",
            help="With --file: also require every event the store has since the file's "
            "oldest to be in the file (a full disk, a killed process can leave it short), "
            "naming the first one missing.",
        ),
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Check every link of the audit chains, their starts and their last checkpoints; exit 1
    naming the chain and the first bad event."""
    from producer.audit import keys as audit_keys  # noqa: PLC0415
    from producer.audit.sinks import verify_file  # noqa: PLC0415

    started = time.perf_counter()
    if file is not None:
        if not file.exists() and not file.with_name(f"{file.name}.1").exists():
            fail(f"no audit file at {file}", 2, as_json=as_json)
        keys = audit_keys.load(load_settings().database_url)
        report = verify_file(file, allow_anchor=anchored, keys=keys, witness=_witness(witness))
        if complete and report.ok:
            report.problem = _short_of_store(file)
    else:
        audit = _store().audit
        latest = audit.witnessed(_witness(witness))
        if latest.problem is not None:
            report = Report("store", problem=latest.problem)
        else:
            report = audit.verify(tenant=tenant, checkpoints=latest.checkpoints)
    _print_report(report, time.perf_counter() - started, as_json)
    if not report.ok:
        raise typer.Exit(1)


@audit_app.command("checkpoint")
@handled
def checkpoint_cmd(
    tenant: Annotated[
        str | None, typer.Option("--tenant", "-t", help="Only this tenant's chain.")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Write a signed checkpoint of every chain's head (and the audit file's) to the witness.

    Workers write them as they go; run this after an upgrade, before a backup, or from cron
    when no worker runs.
    """
    from producer.audit.trail import Trail  # noqa: PLC0415
    from producer.audit.witness import writer  # noqa: PLC0415

    settings = load_settings()
    trail = Trail.from_settings(settings)
    assert trail.witness is not None
    store = _store()
    written = store.audit.checkpoints(None if tenant is None else [tenant], by=writer())
    trail.witness.write(written)
    if tenant is None:
        written += trail.checkpoint_files()
    if as_json:
        print(
            json.dumps(
                {
                    "witness": str(trail.witness.path),
                    "checkpoints": [
                        {"kind": cp.kind, "chain": cp.chain, "seq": cp.seq, "hash": cp.hash}
                        for cp in written
                    ],
                }
            )
        )
        return
    for cp in written:
        where = cp.chain if cp.kind == "store" else f"{cp.chain} ({settings.audit_log})"
        out.print(f"{where}: checkpointed at seq {cp.seq} ({cp.hash[:16]}…)", highlight=False)
    out.print(f"{len(written)} checkpoint(s) written to {trail.witness.path}", highlight=False)


@audit_app.command("export")
@handled
def export_cmd(
    since: Annotated[
        str | None, typer.Option(help="Only events from this time on (ISO 8601, UTC if bare).")
    ] = None,
    tenant: Annotated[
        str | None, typer.Option("--tenant", "-t", help="Only this tenant's chain.")
    ] = None,
    command: Annotated[
        str | None, typer.Option("--command", metavar="ID", help="Only this command's events.")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Stream the store's events as JSON lines, oldest first (for Loki, ELK, or a file).

    Each line carries its chain links, so `execq audit verify --file` checks the export
    (with --anchored when it starts mid-way).
    """
    del as_json  # the output is JSON lines already
    start = _when(since, "--since")
    since_ns = int(start.timestamp() * 1_000_000_000) if start else None
    write = sys.stdout.write
    count = 0
    store = _store()
    if command is not None:
        command = _command_id(store, command)
    for event in store.audit.events(tenant=tenant, since_ns=since_ns, command_id=command):
        write(json.dumps(event.to_json(), ensure_ascii=False, separators=(",", ":")) + "\n")
        count += 1
    sys.stdout.flush()
    print(f"exported {count} audit events", file=sys.stderr)


@audit_app.command("show")
@handled
def show_cmd(
    command_id: Annotated[str, typer.Argument(metavar="ID")],
    as_json: JsonOpt = False,
) -> None:
    """One command's audit events, phase by phase."""
    store = _store()
    command_id = _command_id(store, command_id)
    events = list(store.audit.events(command_id=command_id))
    if not events:
        fail(f"no audit events for command {command_id!r}", 1, as_json=as_json)
    if as_json:
        print(json.dumps([e.to_json() for e in events]))
        return
    table = Table(title=f"audit trail of {command_id}", title_justify="left")
    for col in ("seq", "time", "attempt", "phase", "outcome", "ms", "actor", "reason"):
        table.add_column(col)
    for e in events:
        style = {"ok": "green", "refused": "magenta", "failed": "red"}.get(e.outcome, "")
        table.add_row(
            str(e.seq),
            e.ts[11:23],
            str(e.attempt),
            e.phase,
            f"[{style}]{e.outcome}[/]",
            f"{e.duration_ns / 1e6:.1f}",
            e.operator or e.actor,
            e.reason or "",
        )
    out.print(table)


@audit_app.command("prune")
@handled
def prune_cmd(
    before: Annotated[str, typer.Option(help="Remove events older than this (ISO 8601).")],
    tenant: Annotated[
        str | None, typer.Option("--tenant", "-t", help="Only this tenant's chain.")
    ] = None,
    operator: Annotated[
        str | None, typer.Option(help="Who prunes (default: OS user); recorded in the chain.")
    ] = None,
    yes: Annotated[bool, typer.Option("--yes", help="Do it (without: show what would go).")] = (
        False
    ),
    as_json: JsonOpt = False,
) -> None:
    """Delete old events, keeping every chain verifiable from a signed anchor.

    Each pruned chain keeps an anchor (the hash the first kept event links to, signed with the
    audit key) and gets a `prune` event saying who removed how many events.
    """
    from producer.identity import default_principal  # noqa: PLC0415

    cutoff = _when(before, "--before")
    assert cutoff is not None
    store = _store()
    if not yes:
        plan = store.audit.prune_plan(before=cutoff, tenant=tenant)
        if as_json:
            print(json.dumps({"dry_run": True, "would_remove": plan}))
        else:
            for chain, count in sorted(plan.items()):
                out.print(f"{chain}: {count} events older than {cutoff.isoformat()}")
            out.print("nothing removed; run again with --yes to prune")
        return
    done = store.audit.prune(before=cutoff, actor=operator or default_principal(), tenant=tenant)
    if as_json:
        print(json.dumps({"dry_run": False, "removed": done}))
    else:
        for chain, count in sorted(done.items()):
            out.print(f"{chain}: removed {count} events; the chain is anchored and verifiable")
        if not done:
            out.print(f"no events older than {cutoff.isoformat()}")
