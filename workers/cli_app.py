"""The `execq` command tree: the command line for operators, scripts and the worker process.

Exit status: 0 success, 1 the thing asked failed (the command failed, not found, refused),
2 bad usage or invalid settings, 130 interrupted (Ctrl-C). Every command takes `--json`.
"""

from __future__ import annotations

import getpass
import json
import os
import shlex
import signal
import sys
import time
from importlib.metadata import version
from typing import TYPE_CHECKING, Annotated

import typer

from producer.environ import check as check_environment
from producer.errors import AmbiguousId, NotFound, StoreError
from producer.settings import ConfigInvalid, Settings, load_settings
from producer.spec import CommandSpec
from producer.states import State
from producer.tenants import host_conflicts
from workers import cli_batch, cli_revert
from workers.cli_actions import actions as actions_cmd
from workers.cli_actions import parse_params
from workers.cli_audit import audit_app
from workers.cli_batch import batch_app
from workers.cli_compose import compose_app
from workers.cli_config import config_app
from workers.cli_gateway import gateway as gateway_cmd
from workers.cli_list import list_cmd
from workers.cli_logs import logs as logs_cmd
from workers.cli_show import load, open_producer, print_record
from workers.cli_token import token_app
from workers.cli_wait import wait as wait_cmd
from workers.cli_wait import wait_showing
from workers.clikit import (
    JsonOpt,
    OperatorOpt,
    ReasonOpt,
    TicketOpt,
    err,
    fail,
    handled,
    interrupted,
    out,
    run_app,
)

if TYPE_CHECKING:
    from workers.stack import Stack

app = typer.Typer(
    name="execq",
    help=(
        "Run OS commands for many tenants on Celery and Redis: auditable, traceable, "
        "reversible.\n\nSettings come from EXECQ_* variables (see README); "
        "every command takes --json."
    ),
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="rich",
    # Every command and sub-command inherits it from this root context.
    context_settings={"help_option_names": ["-h", "--help"]},
)
db_app = typer.Typer(help="The results store.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(audit_app, name="audit")
app.add_typer(batch_app, name="batch")
app.add_typer(config_app, name="config")
app.add_typer(compose_app, name="compose")
app.add_typer(token_app, name="token")
app.command("actions")(actions_cmd)
app.command("gateway")(gateway_cmd)
app.command("list")(list_cmd)
app.command("logs")(logs_cmd)
app.command("wait")(wait_cmd)


def _print_version(value: bool) -> None:
    if value:
        print(version("execq"))
        raise typer.Exit()


@app.callback()
def _root(
    _version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_print_version, is_eager=True, help="Print the version, exit."
        ),
    ] = False,
) -> None:
    # Options of `execq` itself, before any command; the help is the Typer's.
    return


def _setup_logging(level: str = "WARNING", settings: Settings | None = None) -> None:
    from producer import logs  # noqa: PLC0415

    # JSON lines for machines (workers, log pipelines); readable lines on a terminal.
    fmt = settings.log_format if settings is not None else "auto"
    logs.configure(level=level, json=fmt == "json" or (fmt == "auto" and not sys.stderr.isatty()))


# --- commands ----------------------------------------------------------------------------


@app.command()
@handled
def submit(
    tenant: Annotated[str, typer.Option("--tenant", "-t", help="Tenant whose pool runs it.")],
    argv: Annotated[
        list[str] | None,
        typer.Argument(help="The command, after `--`: ARGV[0] absolute (or use --action)."),
    ] = None,
    action: Annotated[
        str | None,
        typer.Option(help="Run the tenant's action NAME instead of an argv (`execq actions`)."),
    ] = None,
    param: Annotated[
        list[str] | None,
        typer.Option(help="NAME=VALUE for the action, converted by its type; repeat."),
    ] = None,
    key: Annotated[
        str | None, typer.Option("--key", "-k", help="Idempotency key: same key, same command.")
    ] = None,
    timeout: Annotated[float | None, typer.Option(help="Wall-clock seconds (<= ceiling).")] = None,
    env: Annotated[list[str] | None, typer.Option(help="NAME=VALUE for the child; repeat.")] = None,
    secret_env: Annotated[
        list[str] | None,
        typer.Option(help="NAME: pass $NAME from this shell as a secret (never in argv); repeat."),
    ] = None,
    compensate: Annotated[
        str | None, typer.Option(help="Undo command line (split like a shell, run without one).")
    ] = None,
    rollback_on_failure: Annotated[
        bool,
        typer.Option(
            help="Roll back automatically if it fails (needs --compensate or --snapshot)."
        ),
    ] = False,
    retry_safe: Annotated[
        bool, typer.Option(help="May be re-run (after a lost worker, or by --max-retries).")
    ] = False,
    max_retries: Annotated[
        int,
        typer.Option(min=0, max=20, help="Automatic re-runs with backoff (needs --retry-safe)."),
    ] = 0,
    snapshot: Annotated[
        list[str] | None,
        typer.Option(help="Archive this path first; the rollback restores it. Repeat."),
    ] = None,
    wait: Annotated[
        bool, typer.Option("--wait", "-w", help="Wait for the end; exit 1 unless it succeeded.")
    ] = False,
    wait_timeout: Annotated[float, typer.Option(help="Seconds to --wait.")] = 300.0,
    as_json: JsonOpt = False,
) -> None:
    """Submit a command: [bold]execq submit --tenant acme -- /bin/echo hello[/].

    Or an action: [bold]execq submit --tenant acme --action greet --param name=bob[/].
    """
    if bool(argv) == (action is not None):
        fail("give the command after `--`, or --action NAME (not both)", 2, as_json=as_json)
    if param and action is None:
        fail("--param goes with --action", 2, as_json=as_json)
    env_map: dict[str, str] = {}
    for item in env or []:
        name, sep, value = item.partition("=")
        if not sep:
            fail(f"--env takes NAME=VALUE, got {item!r}", 2, as_json=as_json)
        env_map[name] = value
    secrets: dict[str, str] = {}
    for name in secret_env or []:
        if name not in os.environ:
            fail(f"--secret-env {name}: ${name} is not set in this shell", 2, as_json=as_json)
        secrets[name] = os.environ[name]
    what: dict[str, object] = {"argv": tuple(argv or ())}
    if action is not None:
        what = {"action": action, "params": parse_params(param or [], load()[1], tenant, action)}
    spec = CommandSpec(
        tenant=tenant,
        **what,
        idempotency_key=key,
        timeout_s=timeout,
        env=env_map,
        secrets=secrets,
        compensate=tuple(shlex.split(compensate)) if compensate else None,
        rollback_on_failure=rollback_on_failure,
        retry_safe=retry_safe,
        max_retries=max_retries,
        snapshot_paths=tuple(snapshot or ()),
    )
    with open_producer() as producer:
        result = producer.submit(spec)
        if not wait:
            if as_json:
                print(
                    json.dumps(
                        {"id": result.id, "state": str(result.state), "duplicate": result.duplicate}
                    )
                )
            else:
                dup = (
                    " (duplicate: this key was seen before, nothing new queued)"
                    if result.duplicate
                    else ""
                )
                out.print(f"{result.id} {result.state}{dup}", highlight=False)
            if producer.flush(timeout=2.0):
                err.print(
                    "note: Redis is unreachable; the command is stored and will be "
                    "published by a worker's outbox as soon as Redis is back"
                )
            return
        try:
            rec = wait_showing(producer, result.id, wait_timeout, quiet=as_json)
        except KeyboardInterrupt:
            interrupted(result.id)
        if as_json:
            print(json.dumps({**rec.to_json(), "duplicate": result.duplicate}, default=str))
        else:
            print_record(rec, False)
        if rec.state is not State.SUCCEEDED:
            raise typer.Exit(1)


@app.command()
@handled
def status(
    command_id: Annotated[str, typer.Argument(metavar="ID")],
    history: Annotated[bool, typer.Option(help="Show every state change.")] = True,
    as_json: JsonOpt = False,
) -> None:
    """Show one command (state, exit code, output, limits, compensation, history), or a batch."""
    with open_producer() as producer:
        try:
            rec = producer.get(command_id, with_transitions=history)
        except AmbiguousId:
            raise
        except NotFound as missing:
            # A batch id is as likely as a command id here: show that instead.
            try:
                found = producer.get_batch(command_id)
            except AmbiguousId:
                raise
            except NotFound:
                # The command's message says why (a prefix too short, say): batches alike.
                raise NotFound(
                    str(missing).replace("no command ", "no command or batch ", 1)
                ) from None
            cli_batch.print_batch(found, as_json)
            return
        print_record(rec, as_json)


@app.command()
@handled
def retry(
    command_id: Annotated[str, typer.Argument(metavar="ID")],
    operator: OperatorOpt = None,
    reason: ReasonOpt = None,
    ticket: TicketOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Queue a failed, revoked or reverted command again (attempts + 1); audited."""
    with open_producer() as producer:
        rec = producer.retry(command_id, operator=operator, reason=reason, ticket=ticket)
        print_record(rec, as_json)


app.command("rollback")(cli_revert.rollback)
app.command("override")(cli_revert.override)
app.command("approve")(cli_revert.approve)
app.command("submit-batch")(cli_batch.submit_batch)


@app.command()
@handled
def revoke(
    command_id: Annotated[str, typer.Argument(metavar="ID")],
    terminate: Annotated[
        bool, typer.Option(help="Kill it (whole process tree) if it runs.")
    ] = False,
    operator: OperatorOpt = None,
    reason: ReasonOpt = None,
    ticket: TicketOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Revoke a command: pending never runs; running is killed with --terminate; audited."""
    with open_producer() as producer:
        rec = producer.revoke(
            command_id, terminate=terminate, operator=operator, reason=reason, ticket=ticket
        )
        if rec.state is State.RUNNING:
            rec = producer.wait(command_id, timeout=30)
        print_record(rec, as_json)


@db_app.command("upgrade")
@handled
def db_upgrade(as_json: JsonOpt = False) -> None:
    """Create or migrate the results store to the newest schema (safe to repeat)."""
    from producer.store.db import make_engine  # noqa: PLC0415
    from producer.store.migrate import upgrade  # noqa: PLC0415

    settings = load_settings()
    engine = make_engine(settings.database_url)
    try:
        before, after = upgrade(engine)
    except Exception as exc:
        raise StoreError(f"migration failed: {exc}") from exc
    finally:
        engine.dispose()
    url = engine.url.render_as_string(hide_password=True)
    if as_json:
        print(json.dumps({"database": url, "from": before, "to": after}))
    elif before == after:
        out.print(f"{url}: already at revision {after}")
    else:
        out.print(f"{url}: migrated {before or 'empty'} → {after}")


@app.command()
@handled
def worker(
    tenant: Annotated[
        str, typer.Option("--tenant", "-t", help="The tenant whose queue this worker consumes.")
    ],
    concurrency: Annotated[
        int | None,
        typer.Option(
            "--concurrency", "-c", min=1, max=256, help="Pool processes (default: the tenant's)."
        ),
    ] = None,
    loglevel: Annotated[str, typer.Option(help="DEBUG, INFO, WARNING…")] = "INFO",
    metrics_port: Annotated[
        int | None,
        typer.Option(min=0, max=65535, help="Serve Prometheus /metrics and /healthz on this port."),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """The worker process itself (SIGTERM = warm shutdown; prints a line with "ready")."""
    from producer.broker import resolve_broker_url  # noqa: PLC0415
    from workers.app import run_worker  # noqa: PLC0415
    from workers.runtime import WorkerConfig  # noqa: PLC0415

    settings, tenants = load()
    found = tenants.get(tenant)
    if found is None:
        fail(
            f"tenant {tenant!r} is not in {settings.tenants_file} "
            f"(known: {', '.join(sorted(tenants.tenants))})",
            2,
            as_json=as_json,
        )
    conflicts = host_conflicts([found])
    if conflicts:
        fail(
            f"invalid setting EXECQ_TENANTS_FILE: {settings.tenants_file}: {conflicts[0]}",
            2,
            as_json=as_json,
        )
    if found.run_as is not None and (concurrency or 0) > found.run_as.uids:
        fail(
            f"--concurrency {concurrency} is more than the {found.run_as.uids} uid(s) of tenant "
            f"{tenant!r}'s run_as range {found.run_as.uid_range} (one uid per pool process)",
            2,
            as_json=as_json,
        )
    from workers.sandbox import detect_capabilities  # noqa: PLC0415

    missing = detect_capabilities().can_isolate(
        run_as=found.run_as is not None,
        no_network=not found.network,
        filesystem=found.filesystem is not None and found.filesystem.required,
    )
    if missing is not None:
        # The tenant requires it: never run its commands with less than it asked for.
        fail(f"tenant {tenant!r} cannot be served on this host: {missing}", 2, as_json=as_json)
    from workers.sandbox.resolve import pin_executables  # noqa: PLC0415

    # Before the pool forks: every pool process allows the files the allow-list names now.
    pin_executables(found.executables)
    _setup_logging(loglevel, settings)
    from producer import telemetry  # noqa: PLC0415

    telemetry.exporter_name()  # a bad OTEL_* setting stops the worker now (exit 2)
    from workers import metrics  # noqa: PLC0415

    metrics.prepare()  # before any process creates a metric
    from producer.signing import signer_from_env  # noqa: PLC0415

    signer = signer_from_env()
    if signer is None and settings.env.value == "prod":
        fail(
            "EXECQ_ENV=prod needs signed messages: set EXECQ_SIGNING_KEY or "
            "EXECQ_SIGNING_KEY_FILE (the same key on producers and workers)",
            2,
            as_json=as_json,
        )
    if found.run_as is None and settings.env.value == "prod":
        # Without it, commands run as this worker's user: as root, they could read every key
        # file and the store, whatever capabilities they lose.
        fail(
            f"EXECQ_ENV=prod needs run_as for tenant {tenant!r} (its commands would run as "
            f"{getpass.getuser()}, the worker's user): give it a uid range in "
            f"{settings.tenants_file} (environments: prod: run_as:)",
            2,
            as_json=as_json,
        )
    from workers.boundary import exposed  # noqa: PLC0415

    for problem in exposed(settings, found)[:1]:
        fail(f"tenant {tenant!r} cannot be served safely: {problem}", 2, as_json=as_json)
    from producer.sealing import sealer_from_env  # noqa: PLC0415

    config = WorkerConfig(
        settings=settings,
        tenants=tenants,
        tenant=found,
        broker_url=resolve_broker_url(settings),
        concurrency=concurrency or found.concurrency,
        metrics_port=metrics_port,
        signer=signer,
        sealer=sealer_from_env(settings).for_tenant(found.name),
    )
    from producer.audit import keys as audit_keys  # noqa: PLC0415
    from workers import secrecy  # noqa: PLC0415

    # Read once, then out of reach of anything that reads this process's environment.
    audit_keys.preload(settings.database_url)
    secrecy.forget()
    raise typer.Exit(run_worker(config, loglevel=loglevel))


@app.command()
@handled
def flower(
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to listen on.")] = 5555,
    address: Annotated[str, typer.Option(help="Address to bind (loopback by default).")] = (
        "127.0.0.1"
    ),
    insecure_dev: Annotated[
        bool,
        typer.Option(
            "--insecure-dev", help="Start without authentication (a trusted machine only)."
        ),
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Flower for the execq broker; refuses to start unless FLOWER_BASIC_AUTH (or OAuth) is set.

    A revoke or terminate made in Flower reaches the store through the workers: a queued
    command ends `revoked` and never runs; a running one has its process tree killed.
    """
    from workers.flower import run_flower  # noqa: PLC0415

    settings, tenants = load()
    run_flower(settings, tenants, port=port, address=address, insecure_dev=insecure_dev)


@app.command()
@handled
def up(as_json: JsonOpt = False) -> None:
    """The whole local stack (Redis if none, store, a worker per tenant) until Ctrl-C."""
    from workers.stack import Stack  # noqa: PLC0415

    settings, tenants = load()
    stack = Stack(settings, tenants)
    stopping = False

    def _stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, _stop)
    stack.start()  # stops what it started if interrupted
    # From here on every way out stops the workers: they run in sessions of their own, so a
    # Ctrl-C (or a SIGTERM) that reaches only this process would otherwise leave them running.
    try:
        _announce(stack, settings, as_json)
        while not stopping and all(p.poll() is None for p in stack.workers.values()):
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        stack.stop()
    if not as_json:
        out.print("stopped")


def _announce(stack: Stack, settings: Settings, as_json: bool) -> None:
    """What `execq up` started, without the password of either server."""
    from sqlalchemy.engine import make_url  # noqa: PLC0415

    from producer.redisconn import shown_url  # noqa: PLC0415

    broker = shown_url(stack.broker_url)
    store = make_url(settings.database_url).render_as_string(hide_password=True)
    info = {
        "broker": broker,
        "database": store,
        "workers": {n: p.pid for n, p in stack.workers.items()},
        "logs": str(stack.log_dir),
    }
    if as_json:
        print(json.dumps(info), flush=True)
        return
    out.print(f"execq is up: broker {broker}, store {store}")
    for name, proc in stack.workers.items():
        out.print(f"  worker {name}: pid {proc.pid}, log {stack.log_dir}/worker-{name}.log")
    if stack.embedded is not None:
        out.print("  (embedded Redis: other shells use EXECQ_BROKER_URL=embedded)")
    out.print("Ctrl-C stops everything started here.")


@app.command()
@handled
def demo(as_json: JsonOpt = False) -> None:
    """The main job: success, failure, a killed process tree, a refusal, a duplicate key."""
    from workers.demo import run_demo  # noqa: PLC0415

    settings, tenants = load()
    _setup_logging("WARNING")
    raise typer.Exit(run_demo(settings, tenants, as_json=as_json, console=out))


def run() -> None:
    """Run the command line: settings errors exit 2 naming the setting, an unknown EXECQ_*
    variable before anything else runs; usage errors are one line when stderr is no terminal."""
    try:
        check_environment(os.environ)
        code = run_app(app)
    except ConfigInvalid as exc:
        err.print(f"error: {exc}", highlight=False, markup=False)
        sys.exit(2)
    sys.exit(code)
