"""`execq rollback` and `execq override`: undoing a command, and settling one by hand."""

from __future__ import annotations

from typing import Annotated

import typer

from producer.states import State
from workers.cli_show import open_producer, print_record
from workers.clikit import JsonOpt, OperatorOpt, ReasonOpt, TicketOpt, handled


@handled
def rollback(
    command_id: Annotated[str, typer.Argument(metavar="ID")],
    operator: OperatorOpt = None,
    reason: ReasonOpt = None,
    ticket: TicketOpt = None,
    expect_version: Annotated[
        int | None,
        typer.Option(help="Refuse unless the command is still at this version (from status)."),
    ] = None,
    wait: Annotated[bool, typer.Option(help="Wait for the compensation's end.")] = False,
    wait_timeout: Annotated[float, typer.Option(help="Seconds to --wait.")] = 300.0,
    as_json: JsonOpt = False,
) -> None:
    """Run a command's compensation: succeeded, failed or revert_failed → reverting → reverted.

    Only one rollback can ever run for a command; a second one is refused and says why.
    With --wait, exits 1 unless the command ends reverted. Retrying a failed compensation
    is this same command again.
    """
    with open_producer() as producer:
        rec = producer.rollback(
            command_id,
            operator=operator,
            reason=reason,
            ticket=ticket,
            expect_version=expect_version,
        )
        if wait:
            rec = producer.wait(command_id, timeout=wait_timeout)
        print_record(producer.get(command_id, with_transitions=True), as_json)
        if wait and rec.state is not State.REVERTED:
            raise typer.Exit(1)


@handled
def override(
    command_id: Annotated[str, typer.Argument(metavar="ID")],
    # Optional to Typer so that a missing one is refused (and audited) by name, not by usage.
    ticket: Annotated[str | None, typer.Option(help="Ticket (required).")] = None,
    operator: Annotated[str | None, typer.Option(help="Who settles it (required).")] = None,
    reason: Annotated[str | None, typer.Option(help="Why (required).")] = None,
    resolution: Annotated[
        str, typer.Option(help="What the command becomes: reverted or failed.")
    ] = "reverted",
    force: Annotated[
        bool,
        typer.Option(help="Also settle a command that is not revert_failed (needs --approver)."),
    ] = False,
    approver: Annotated[
        str | None, typer.Option(help="With --force: the second person approving it.")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Settle a revert_failed command by hand, e.g. after undoing its effects manually.

    [bold]execq override ID --ticket OPS-12 --operator alice --reason "restored by hand"
    --resolution reverted[/]. Ticket, operator and reason are all required and audited.
    """
    with open_producer() as producer:
        producer.override(
            command_id,
            ticket=ticket,
            operator=operator,
            reason=reason,
            resolution=resolution,
            force=force,
            approver=approver,
        )
        print_record(producer.get(command_id, with_transitions=True), as_json)
