"""`execq rollback`, `execq override` and `execq approve`: undoing a command, settling one by
hand, and a second person approving a forced settlement."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from producer.identity import os_identity
from producer.states import State
from workers.cli_show import open_producer, print_record
from workers.clikit import JsonOpt, OperatorOpt, ReasonOpt, TicketOpt, handled, out


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
    wait: Annotated[
        bool, typer.Option("--wait", "-w", help="Wait for the compensation's end.")
    ] = False,
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
    operator: Annotated[
        str | None, typer.Option(help="Who settles it (required; recorded beside your OS user).")
    ] = None,
    reason: Annotated[str | None, typer.Option(help="Why (required).")] = None,
    resolution: Annotated[
        str, typer.Option(help="What the command becomes: reverted or failed.")
    ] = "reverted",
    force: Annotated[
        bool,
        typer.Option(
            help="Ask to settle a command that is not revert_failed: someone else then runs "
            "`execq approve`."
        ),
    ] = False,
    # Still parsed so that using it is refused with the new way, and audited.
    approver: Annotated[str | None, typer.Option(hidden=True)] = None,
    as_json: JsonOpt = False,
) -> None:
    """Settle a revert_failed command by hand, e.g. after undoing its effects manually.

    [bold]execq override ID --ticket OPS-12 --operator alice --reason "restored by hand"
    --resolution reverted[/]. Ticket, operator and reason are all required and audited, with
    the OS user running this. With --force nothing changes yet: the override is asked for,
    and carried out when a different OS user runs [bold]execq approve ID --ticket OPS-12[/].
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
            identity=os_identity(),
        )
        rec = producer.get(command_id, with_transitions=True)
        pending = producer.pending_override(command_id) if force else None
        if pending is None:
            print_record(rec, as_json)
        elif as_json:
            print(json.dumps({**rec.to_json(), "pending_override": pending.to_json()}, default=str))
        else:
            print_record(rec, as_json)
            out.print(
                f"override to {pending.resolution} asked for by {pending.requested_by}; "
                f"nothing changes until someone else runs: execq approve {command_id} "
                f"--ticket {pending.ticket}",
                highlight=False,
                markup=False,
            )


@handled
def approve(
    command_id: Annotated[str, typer.Argument(metavar="ID")],
    ticket: Annotated[
        str | None, typer.Option(help="The ticket of the override approved (required).")
    ] = None,
    reason: ReasonOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Carry out a forced override that someone else asked for with `execq override --force`.

    [bold]execq approve ID --ticket OPS-12[/]. The approver is the OS user running this; it
    must not be the one who asked. Refused (and audited) when nothing is waiting, when the
    ticket differs, or when the command changed since it was asked for.
    """
    with open_producer() as producer:
        producer.approve(command_id, ticket=ticket, reason=reason, identity=os_identity())
        print_record(producer.get(command_id, with_transitions=True), as_json)
