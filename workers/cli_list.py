"""`execq list`: the newest commands, their ids as short as they stay unique (so each pastes
back into any command taking an id), once or refreshed with `--watch`."""

from __future__ import annotations

import json
import shlex
import sys
import time
from contextlib import suppress
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Group
from rich.live import Live
from rich.table import Table

from producer.record import CommandRecord
from producer.states import State
from workers.cli_show import STATE_STYLE, open_producer
from workers.clikit import JsonOpt, handled, out

if TYPE_CHECKING:
    from producer.client import Producer

ARGV_SHOWN = 60  # characters of a command line a row shows
ARGV_MIN = 16  # below this, the command line is left out rather than wrapped to shreds


@handled
def list_cmd(
    tenant: Annotated[str | None, typer.Option("--tenant", "-t", help="Only this tenant.")] = None,
    state: Annotated[State | None, typer.Option(help="Only this state.")] = None,
    since: Annotated[
        datetime | None, typer.Option(help="Only commands created since (ISO 8601, UTC).")
    ] = None,
    needs_attention: Annotated[
        bool, typer.Option(help="Only commands whose compensation failed (revert_failed).")
    ] = False,
    limit: Annotated[int, typer.Option(min=1, max=10_000)] = 50,
    watch: Annotated[
        bool,
        typer.Option(
            "--watch",
            help="Refresh until Ctrl-C (exit 0): in place on a terminal; into a pipe, the "
            "table again after a blank line, or with --json one document a line.",
        ),
    ] = False,
    interval: Annotated[
        float, typer.Option(min=0.1, help="Seconds between refreshes with --watch.")
    ] = 2.0,
    as_json: JsonOpt = False,
) -> None:
    """List commands, newest first.

    Ids show as the shortest prefix unique in the store; --json gives them whole.
    """
    if since is not None and since.tzinfo is None:
        since = since.replace(tzinfo=UTC)
    filters: dict[str, Any] = {
        "tenant": tenant,
        "state": state,
        "since": since,
        "needs_attention": needs_attention,
        "limit": limit,
    }
    with open_producer() as producer:
        if not watch:
            _show(producer, filters, as_json)
            return
        # Ctrl-C is how a watch ends: no message, status 0.
        with suppress(KeyboardInterrupt):
            _watch(producer, filters, as_json, interval)


def _show(producer: Producer, filters: dict[str, Any], as_json: bool) -> None:
    records = producer.list(**filters)
    if as_json:
        print(_document(records), flush=True)
    else:
        out.print(_table(producer, records))
        sys.stdout.flush()


def _watch(producer: Producer, filters: dict[str, Any], as_json: bool, interval: float) -> None:
    if as_json or not out.is_terminal:
        first = True
        while True:
            if not first and not as_json:
                out.print()
            _show(producer, filters, as_json)
            first = False
            time.sleep(interval)
    with Live(console=out, auto_refresh=False) as live:
        while True:
            live.update(_table(producer, producer.list(**filters)), refresh=True)
            time.sleep(interval)


def _document(records: list[CommandRecord]) -> str:
    return json.dumps([r.to_json() for r in records], default=str)


def _table(producer: Producer, records: list[CommandRecord]) -> Group:
    shown = producer.unique_prefixes(r.id for r in records)
    rows = [
        {
            "id": shown[r.id],
            "tenant": r.tenant,
            "state": f"[{STATE_STYLE.get(r.state, '')}]{r.state}[/]",
            "exit": "" if r.exit_code is None else str(r.exit_code),
            "reason": r.failure_reason or "",
            "argv": shlex.join(r.argv)[:ARGV_SHOWN],
            "created": f"{r.created_at:%Y-%m-%d %H:%M:%S}",
        }
        for r in records
    ]
    names = _fitting(
        {
            "id": max((len(p) for p in shown.values()), default=2),
            "tenant": max((len(r.tenant) for r in records), default=6),
            "state": max((len(r.state) for r in records), default=5),
            "argv": ARGV_MIN,
            "created": 19,
            "exit": 4,
            "reason": 6,
        }
    )
    table = Table()
    for name, width in names.items():
        # The id is never cut nor wrapped, however narrow the terminal: it is pasted back.
        # Only the command line and the reason wrap; what does not fit is left out.
        wraps = name in {"argv", "reason"}
        table.add_column(name, no_wrap=not wraps, min_width=None if wraps else width)
    for row in rows:
        table.add_row(*(row[name] for name in names))
    return Group(table, f"{len(records)} command(s)")


def _fitting(widths: dict[str, int]) -> dict[str, int]:
    """The columns (in the table's order) that fit the console: the last ones of `widths`,
    which lists them most wanted first, are left out until the rest fit."""
    order = ("id", "tenant", "state", "exit", "reason", "argv", "created")
    kept = list(widths)
    # Each column takes its width, a space either side and one border.
    while len(kept) > 1 and sum(widths[n] + 3 for n in kept) + 1 > out.width:
        kept.pop()
    return {name: widths[name] for name in order if name in kept}
