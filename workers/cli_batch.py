"""`execq submit-batch FILE.yaml` and `execq batch …`: sagas from the command line."""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from rich.table import Table

from producer.errors import SpecError
from producer.saga import BatchRecord
from workers.cli_show import STATE_STYLE, open_producer
from workers.clikit import JsonOpt, OperatorOpt, ReasonOpt, TicketOpt, fail, handled, out

batch_app = typer.Typer(help="Batches (sagas): show, wait for, revoke.", no_args_is_help=True)

EXAMPLE = """\
tenant: acme
idempotency_key: provision-42      # optional: the same key never runs the batch twice
compensate_on_revoke: false        # optional: undo finished steps when revoked
steps:                             # run in order; if step k fails, k-1 … 1 are undone
  - argv: [/bin/mkdir, /srv/acme/site]
    compensate: [/bin/rm, -r, /srv/acme/site]
  - argv: [/bin/touch, /srv/acme/site/index.html]
    compensate: [/bin/rm, /srv/acme/site/index.html]
"""


def read_batch(path: Path) -> dict[str, Any]:
    """The batch file as a mapping; SpecError naming the file and what is wrong."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise SpecError(f"cannot read batch file {path}: {exc}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("steps"), list):
        raise SpecError(
            f"batch file {path} needs a mapping with `steps:` (a list); e.g.\n{EXAMPLE}"
        )
    unknown = set(raw) - {"tenant", "idempotency_key", "compensate_on_revoke", "steps"}
    if unknown:
        raise SpecError(f"batch file {path}: unknown keys {sorted(unknown)}")
    return raw


@handled
def submit_batch(
    file: Annotated[Path, typer.Argument(help="YAML: tenant, steps (see --help).")],
    tenant: Annotated[
        str | None, typer.Option("--tenant", "-t", help="Overrides the file's tenant.")
    ] = None,
    key: Annotated[
        str | None, typer.Option("--key", "-k", help="Overrides the file's idempotency_key.")
    ] = None,
    wait: Annotated[
        bool, typer.Option("--wait", "-w", help="Wait until settled; exit 1 unless succeeded.")
    ] = False,
    wait_timeout: Annotated[float, typer.Option(help="Seconds to --wait.")] = 600.0,
    as_json: JsonOpt = False,
) -> None:
    """Submit a batch of steps that run in order and are undone in reverse if one fails.

    The file looks like this:

    [dim]tenant: acme
    idempotency_key: provision-42
    steps:
      - argv: \\[/bin/mkdir, /srv/acme/site]
        compensate: \\[/bin/rm, -r, /srv/acme/site][/]
    """
    raw = read_batch(file)
    name = tenant or raw.get("tenant")
    if not isinstance(name, str):
        fail(f"batch file {file} names no tenant (add `tenant:` or pass --tenant)", 2)
    with open_producer() as producer:
        result = producer.submit_batch(
            name,
            raw["steps"],
            idempotency_key=key or raw.get("idempotency_key"),
            compensate_on_revoke=bool(raw.get("compensate_on_revoke", False)),
        )
        if not wait:
            if as_json:
                print(json.dumps(result.__dict__))
            else:
                dup = " (duplicate: this key was seen before)" if result.duplicate else ""
                out.print(f"{result.id} {result.state}{dup}", highlight=False)
                for number, cid in enumerate(result.command_ids, 1):
                    out.print(f"  step {number}: {cid}", highlight=False)
            producer.flush(timeout=2.0)
            return
        found = producer.wait_batch(result.id, timeout=wait_timeout)
        print_batch(found, as_json)
        if found.batch.state != "succeeded":
            raise typer.Exit(1)


def print_batch(found: BatchRecord, as_json: bool) -> None:
    """The batch's state, then one line per step."""
    if as_json:
        print(json.dumps(found.to_json(), default=str))
        return
    b = found.batch
    out.print(
        f"batch {b.id} ({b.tenant}): [bold]{b.state}[/]" + (f" — {b.error}" if b.error else "")
    )
    table = Table("step", "id", "state", "exit", "reason", "argv", "compensation")
    for s in found.steps:
        comp = s.compensation or {}
        table.add_row(
            str(s.batch_step),
            s.id,
            f"[{STATE_STYLE.get(s.state, '')}]{s.state}[/]",
            "" if s.exit_code is None else str(s.exit_code),
            s.failure_reason or "",
            shlex.join(s.argv)[:50],
            str(comp.get("state", "")),
        )
    out.print(table)


@batch_app.command("show")
@handled
def show(batch_id: Annotated[str, typer.Argument(metavar="ID")], as_json: JsonOpt = False) -> None:
    """A batch's state and each step's."""
    with open_producer() as producer:
        print_batch(producer.get_batch(batch_id), as_json)


@batch_app.command("wait")
@handled
def wait_batch(
    batch_id: Annotated[str, typer.Argument(metavar="ID")],
    timeout: Annotated[float, typer.Option(help="Give up after this many seconds.")] = 600.0,
    as_json: JsonOpt = False,
) -> None:
    """Wait until a batch is settled; exit 0 only if it succeeded."""
    with open_producer() as producer:
        found = producer.wait_batch(batch_id, timeout=timeout)
        print_batch(found, as_json)
        if found.batch.state != "succeeded":
            raise typer.Exit(1)


@batch_app.command("revoke")
@handled
def revoke(
    batch_id: Annotated[str, typer.Argument(metavar="ID")],
    compensate: Annotated[
        bool | None,
        typer.Option(
            "--compensate/--no-compensate",
            help="Undo the finished steps (default: the batch's compensate_on_revoke).",
        ),
    ] = None,
    operator: OperatorOpt = None,
    reason: ReasonOpt = None,
    ticket: TicketOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Stop a batch: pending steps never run, the running one is killed (whole tree)."""
    with open_producer() as producer:
        found = producer.revoke_batch(
            batch_id, compensate=compensate, operator=operator, reason=reason, ticket=ticket
        )
        print_batch(found, as_json)
