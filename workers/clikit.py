"""What every `execq` subcommand shares: consoles, `--json`, and errors mapped to exit codes."""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import wraps
from typing import Annotated, Any, NoReturn, TypeVar

import typer
from rich.console import Console

from producer.errors import ExecqError, IdempotencyConflict, PolicyDenied, SpecError
from producer.settings import ConfigInvalid

out = Console()
err = Console(stderr=True)

JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]
# Who did an operator action and why: the history and the audit trail record them.
OperatorOpt = Annotated[
    str | None, typer.Option(help="Who does this (default: OTEL_SERVICE_NAME or the OS user).")
]
ReasonOpt = Annotated[str | None, typer.Option(help="Why, for the history and audit trail.")]
TicketOpt = Annotated[str | None, typer.Option(help="Change or incident ticket.")]
F = TypeVar("F", bound=Callable[..., Any])


def fail(message: str, code: int, *, as_json: bool = False, **extra: Any) -> NoReturn:
    if as_json:
        print(json.dumps({"error": message, **extra}))
    else:
        err.print(f"[bold red]error:[/] {message}", highlight=False, markup=True)
    raise typer.Exit(code)


def handled(func: F) -> F:
    """Map execq errors to the exit statuses the contract promises."""

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        as_json = bool(kwargs.get("as_json"))
        try:
            return func(*args, **kwargs)
        except ConfigInvalid as exc:
            fail(str(exc), 2, as_json=as_json)
        except SpecError as exc:
            fail(f"invalid command: {exc}", 2, as_json=as_json)
        except PolicyDenied as exc:
            recorded = f" (recorded as {exc.command_id})" if exc.command_id else ""
            fail(
                f"refused by policy: {exc}{recorded}",
                1,
                as_json=as_json,
                id=exc.command_id,
                state="rejected",
                rule=exc.rule,
            )
        except IdempotencyConflict as exc:
            fail(str(exc), 1, as_json=as_json, id=exc.command_id)
        except TimeoutError as exc:
            fail(str(exc), 1, as_json=as_json)
        except ExecqError as exc:
            fail(str(exc), 1, as_json=as_json)

    return wrapper  # type: ignore[return-value]
