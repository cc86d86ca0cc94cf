"""`execq wait ID`: block until a command ends, with a spinner (state, elapsed time) on a
terminal; a Ctrl-C leaves the command running and says how to follow it."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated

import typer

from producer.record import CommandRecord
from producer.states import State
from workers.cli_show import STATE_STYLE, open_producer, print_record
from workers.clikit import JsonOpt, err, handled, interrupted

if TYPE_CHECKING:
    from producer.client import Producer


def _elapsed(rec: CommandRecord) -> str:
    since = rec.started_at or rec.created_at
    if since.tzinfo is None:
        since = since.replace(tzinfo=UTC)
    seconds = max(0, int((datetime.now(UTC) - since).total_seconds()))
    minutes, seconds = divmod(seconds, 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{seconds:02d}s" if hours else f"{minutes}m{seconds:02d}s"


def _label(command_id: str, rec: CommandRecord | None) -> str:
    if rec is None:
        return f"waiting for {command_id}"
    style = STATE_STYLE.get(rec.state, "")
    # Pending: time in the queue; running: time since it started.
    return f"{command_id} [{style}]{rec.state}[/] for {_elapsed(rec)}"


def wait_showing(
    producer: Producer, command_id: str, timeout: float, *, quiet: bool
) -> CommandRecord:
    """The command's final record; a spinner on stderr while it runs, when stderr is a
    terminal and output is for people (`quiet` for --json: nothing but the answer)."""
    if quiet or not err.is_terminal:
        return producer.wait(command_id, timeout=timeout)
    with err.status(_label(command_id, None)) as status:
        return producer.wait(
            command_id, timeout=timeout, progress=lambda rec: status.update(_label(rec.id, rec))
        )


@handled
def wait(
    command_id: Annotated[str, typer.Argument(metavar="ID")],
    timeout: Annotated[
        float,
        typer.Option(metavar="SECONDS", help="Give up after this many seconds (exit 1)."),
    ] = 300.0,
    as_json: JsonOpt = False,
) -> None:
    """Wait until a command ends; exit 0 only if it succeeded.

    On a terminal a spinner shows its state and how long it has been in it. Ctrl-C stops
    waiting (exit 130), not the command.
    """
    try:
        with open_producer() as producer:
            command_id = producer.resolve_id(command_id)
            rec = wait_showing(producer, command_id, timeout, quiet=as_json)
    except KeyboardInterrupt:
        interrupted(command_id)
    print_record(rec, as_json)
    if rec.state is not State.SUCCEEDED:
        raise typer.Exit(1)
