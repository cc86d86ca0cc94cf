"""What every `execq` subcommand shares: consoles, `--json`, and errors mapped to exit codes."""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import wraps
from typing import Annotated, Any, NoReturn, TypeVar

import typer
from rich.console import Console

# Typer's own copy of click: its usage errors are these, not the `click` package's.
from typer._click.exceptions import ClickException
from typer.rich_utils import rich_format_error

from producer.errors import ExecqError, IdempotencyConflict, PolicyDenied, SpecError
from producer.settings import ConfigInvalid

out = Console()
err = Console(stderr=True)
# A log or a pipe reads an error as one line: wrapped at 80 columns it would be several.
err.soft_wrap = not err.is_terminal

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


def interrupted(command_id: str | None = None) -> NoReturn:
    """Ctrl-C: one line saying what keeps running and how to follow it; exit status 130."""
    if command_id is None:
        err.print("interrupted", highlight=False, markup=False)
    else:
        err.print(
            f"interrupted: command {command_id} keeps running; follow it with "
            f"`execq logs {command_id} -f` or `execq wait {command_id}`",
            highlight=False,
            markup=False,
        )
    raise typer.Exit(130)


# What an option's value is, where its name alone does not say it well.
METAVARS = {
    "timeout": "SECONDS",
    "wait_timeout": "SECONDS",
    "interval": "SECONDS",
    "since": "TIME",
    "before": "TIME",
    "expires": "TIME",
    "port": "PORT",
    "metrics_port": "PORT",
    "env": "NAME=VALUE",
    "param": "NAME=VALUE",
    "secret_env": "NAME",
    "compensate": "CMDLINE",
    "limit": "N",
    "concurrency": "N",
    "workers": "N",
    "max_retries": "N",
    "file": "PATH",
    "witness": "PATH",
    "snapshot": "PATH",
    "tenants": "PATH",
    "output": "PATH",
}


def _choice(param: Any) -> bool:
    # Choices (a state, a scope) show their values, which say more than any metavar.
    descriptor = getattr(param, "type_descriptor", None)
    return bool(getattr(descriptor, "is_choice", False))


def _no_type(ctx: Any) -> None:  # Typer calls it with ctx=
    return None


def _metavars(command: Any) -> None:
    """Metavars people read (TENANT, SECONDS, NAME=VALUE), none for flags, instead of the
    Python types Typer shows (`<str>`, `<bool>`, `<float>`)."""
    for param in getattr(command, "params", []):
        if param.param_type_name == "argument":
            # Its name column shows the metavar (ID, ARGV...) already.
            param.display_type_rich = _no_type
        elif getattr(param, "is_flag", False) or getattr(param, "count", False):
            param.metavar = ""
        elif param.metavar is None and not _choice(param):
            param.metavar = METAVARS.get(param.name or "", (param.name or "value").upper())
    made = command.get_help_option

    def help_option(ctx: Any) -> Any:
        option = made(ctx)
        if option is not None:
            option.metavar = ""  # made per context: a flag too
        return option

    command.get_help_option = help_option
    for sub in getattr(command, "commands", {}).values():
        _metavars(sub)


def command_tree(app: typer.Typer) -> Any:
    """The click command of `app`, its help with metavars (what `execq` runs and shows)."""
    command = typer.main.get_command(app)
    _metavars(command)
    return command


def run_app(app: typer.Typer) -> int:
    """Run the command tree and return its exit status; a usage error is Typer's panel on a
    terminal, one line (`error: …`, the help command beside it) anywhere else."""
    command = command_tree(app)
    try:
        result = command.main(standalone_mode=False)
    except ClickException as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":
            pass  # `execq` alone, or a group without its command: its help is shown already
        elif err.is_terminal:
            rich_format_error(exc)
        else:
            ctx = getattr(exc, "ctx", None)
            hint = f" (see `{ctx.command_path} -h`)" if ctx is not None else ""
            err.print(f"error: {exc.format_message()}{hint}", markup=False, highlight=False)
        return exc.exit_code
    except typer.Abort:
        err.print("aborted", markup=False, highlight=False)
        return 1
    return result if isinstance(result, int) else 0


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
        except KeyboardInterrupt:
            interrupted()

    return wrapper  # type: ignore[return-value]
