"""`execq demo` (`make run`): every guarantee, shown on a live local stack.

Success, a failure rolled back automatically, a timeout that kills a process tree, a policy
refusal, a duplicate key, an action run and an action refused, and a saga whose third step
fails (the first two undone in reverse order); then the audit trail is verified.
"""

from __future__ import annotations

import json
import shlex
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from producer.client import Producer
from producer.errors import ExecqError, PolicyDenied
from producer.record import CommandRecord
from producer.settings import Settings
from producer.spec import CommandSpec
from producer.states import State
from producer.tenants import TenantsFile
from workers.stack import Stack


@dataclass
class Row:
    """One demo case and what came of it."""

    title: str
    tenant: str
    argv: tuple[str, ...]
    expect: State
    action: str | None = None  # with `argv` holding its params, k=v, for display
    command_id: str | None = None
    state: State | None = None
    exit_code: int | None = None
    reason: str = ""
    note: str = ""


def _params(pairs: tuple[str, ...]) -> dict[str, str | int | bool]:
    """A demo row's `k=v` pairs as an action's parameters (digits are integers)."""
    params: dict[str, str | int | bool] = {}
    for pair in pairs:
        name, _, value = pair.partition("=")
        params[name] = int(value) if value.isdigit() else value
    return params


def _alive_with_marker(marker: str) -> int:
    """How many live processes carry `marker` in their command line (the tree after a kill)."""
    count = 0
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if marker.encode() in cmdline and state != "Z":
            count += 1
    return count


def _settled(producer: Producer, command_id: str) -> CommandRecord:
    """Wait for a command, and for the rollback a failure starts, to end."""
    rec = producer.wait(command_id, timeout=60)
    deadline = time.monotonic() + 30
    while rec.rollback_on_failure and rec.state is State.FAILED and rec.compensation is None:
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
        rec = producer.get(command_id)
    return producer.wait(command_id, timeout=60)


def _submit_saga(producer: Producer, scratch: str) -> str:
    """Three steps; the third fails, so the first two are undone, second first."""
    site = f"{scratch}/site"
    log = f"{scratch}/saga.log"

    def step(n: int, action: str, undo: str) -> dict[str, object]:
        return {
            "argv": ["/bin/sh", "-c", f"{action} && echo 'step {n}' >> {log}"],
            "compensate": ["/bin/sh", "-c", f"{undo} && echo 'undo {n}' >> {log}"],
        }

    return producer.submit_batch(
        "acme",
        [
            step(1, f"mkdir {site}", f"rm -r {site}"),
            step(2, f"touch {site}/index.html", f"rm {site}/index.html"),
            step(3, f"ls /nonexistent-{uuid.uuid4().hex[:6]}", "true"),
        ],
    ).id


def _saga_row(producer: Producer, batch_id: str, scratch: str) -> Row:
    found = producer.wait_batch(batch_id, timeout=60)
    row = Row("saga", "acme", ("3 steps:", "mkdir", "touch", "ls (fails)"), State.REVERTED)
    row.command_id = batch_id
    row.state = State(found.batch.state)
    try:
        lines = Path(f"{scratch}/saga.log").read_text().split()
    except OSError:
        lines = []
    order = " → ".join(" ".join(lines[i : i + 2]) for i in range(0, len(lines), 2))
    row.reason = found.batch.error or ""
    row.note = f"{order}; site removed" if not Path(f"{scratch}/site").exists() else order
    if order != "step 1 → step 2 → undo 2 → undo 1":
        row.state = None  # not what a saga must do: shown red
    return row


def run_demo(settings: Settings, tenants: TenantsFile, *, as_json: bool, console: Console) -> int:
    """Start a stack, run the sample commands, print their final states, stop; 0 if as expected."""
    run = uuid.uuid4().hex[:8]
    say = (lambda *_a, **_k: None) if as_json else console.print
    stack = Stack(settings, tenants)
    say("[bold]execq demo[/]: starting a broker, the results store and one worker per tenant…")
    t0 = time.monotonic()
    stack.start()
    say(
        f"  broker {stack.broker_url}{' (embedded)' if stack.embedded else ''}, "
        f"store {settings.database_url}, {len(stack.workers)} workers ready "
        f"in {time.monotonic() - t0:.1f} s"
    )
    # A sleep duration no other process on the host uses: how we find the tree afterwards.
    marker = f"300.{int(run, 16) % 1_000_000:06d}"
    # Where the rollback and saga cases change files (0700, unpredictable name).
    scratch = tempfile.mkdtemp(prefix=f"execq-demo-{run}-")
    rows = [
        Row("success", "acme", ("/bin/echo", "hello from execq"), State.SUCCEEDED),
        # Fails after changing something; its compensation undoes the change by itself.
        Row(
            "failure",
            "acme",
            ("/bin/sh", "-c", f"touch {scratch}/flag && exit 3"),
            State.REVERTED,
        ),
        Row(
            "timeout",
            "acme",
            ("/bin/sh", "-c", f"sleep {marker} & sleep {marker} & wait"),
            State.FAILED,
        ),
        Row("policy", "prod", ("/bin/rm", "-rf", "/srv/important"), State.REJECTED),
        Row("duplicate", "acme", ("/bin/echo", "run once"), State.SUCCEEDED),
        # A typed template instead of an argv: the caller fills parameters, never options.
        Row("action", "acme", ("name=web backend", "count=2"), State.SUCCEEDED, action="greet"),
        # `..` climbs out of the directory the parameter must stay under: refused, recorded.
        Row(
            "action-refused",
            "acme",
            ("path=/tmp/execq-scratch/../../etc",),
            State.REJECTED,
            action="clean-dir",
        ),
    ]
    code = 0
    enforced: str | None = None
    audit_line = ""
    try:
        with Producer.from_settings(
            settings.model_copy(update={"broker_url": stack.broker_url}), tenants
        ) as producer:
            for row in rows:
                kwargs: dict[str, object] = {}
                if row.title == "timeout":
                    kwargs["timeout_s"] = 2.0
                if row.title == "duplicate":
                    kwargs["idempotency_key"] = f"demo-{run}-restart"
                if row.title == "failure":
                    kwargs["compensate"] = ("/bin/rm", "-f", f"{scratch}/flag")
                    kwargs["rollback_on_failure"] = True
                if row.action is not None:
                    kwargs["action"] = row.action
                    kwargs["params"] = _params(row.argv)
                else:
                    kwargs["argv"] = row.argv
                spec = CommandSpec(tenant=row.tenant, **kwargs)
                try:
                    first = producer.submit(spec)
                    row.command_id = first.id
                    if row.title == "duplicate":
                        again = producer.submit(spec)
                        row.note = (
                            "2nd submit: same id, nothing queued"
                            if again.duplicate and again.id == first.id
                            else "2nd submit was NOT a duplicate"
                        )
                except PolicyDenied as denied:
                    row.command_id = denied.command_id
                    row.note = f"refused at submit ({denied.rule}), recorded"
            saga = _submit_saga(producer, scratch)
            for row in rows:
                assert row.command_id is not None
                rec = _settled(producer, row.command_id)
                row.state, row.exit_code = rec.state, rec.exit_code
                row.reason = rec.failure_reason or ""
                if row.title == "timeout":
                    left = _alive_with_marker(marker)
                    row.note = f"tree killed, {left} process(es) left"
                    if left:
                        code = 1
                if row.title == "success" and rec.enforced:
                    enforced = ", ".join(f"{k}={v}" for k, v in rec.enforced.items())
                if row.title == "failure":
                    gone = not Path(f"{scratch}/flag").exists()
                    row.note = f"exit {rec.exit_code}, then rolled back by itself: " + (
                        "its file is gone" if gone else "its file is STILL THERE"
                    )
                    code = code if gone else 1
                if row.state is not row.expect:
                    code = 1
            rows.append(_saga_row(producer, saga, scratch))
            code = code if rows[-1].state is rows[-1].expect else 1
            report = producer.store.audit.verify()
            if report.ok:
                audit_line = (
                    f"audit trail: {report.events} events in {len(report.chains)} chain(s), "
                    "every link intact"
                )
            else:
                audit_line = f"[red]audit trail BROKEN:[/] {report.problem}"
                code = 1
    except ExecqError as exc:
        console.print(f"[red]demo failed:[/] {exc}")
        code = 1
    finally:
        say("stopping everything the demo started…")
        stack.stop()
        shutil.rmtree(scratch, ignore_errors=True)
    if as_json:
        print(
            json.dumps(
                [
                    {
                        "case": r.title,
                        "id": r.command_id,
                        "state": r.state,
                        "expected": r.expect,
                        "exit_code": r.exit_code,
                        "failure_reason": r.reason,
                        "note": r.note,
                    }
                    for r in rows
                ]
            )
        )
        return code
    for r in rows:
        what = f"action {r.action} {shlex.join(r.argv)}" if r.action else shlex.join(r.argv)
        console.print(f"  {r.title:<14} {r.tenant:<5} {what}", markup=False, highlight=False)
    table = Table(title="execq demo: final states")
    for col in ("case", "state", "exit", "reason", "note"):
        table.add_column(col, overflow="fold")
    for r in rows:
        ok = r.state is r.expect
        table.add_row(
            r.title,
            f"[{'green' if ok else 'red'}]{r.state}[/]",
            "" if r.exit_code is None else str(r.exit_code),
            r.reason,
            r.note,
        )
    console.print(table)
    if enforced:
        console.print(f"limits enforced on this host: {enforced}")
    if audit_line:
        console.print(audit_line)
    first_id = rows[0].command_id
    console.print(
        "Next: [bold]execq status "
        f"{first_id}[/] (one record and its history), "
        f"[bold]execq audit show {first_id}[/] (its audit events), "
        "[bold]execq list[/], [bold]execq up[/] to keep the stack running, "
        f"worker logs in {stack.log_dir}/."
    )
    console.print(
        "[green]all cases ended as expected[/]"
        if code == 0
        else "[red]some cases did not end as expected[/]"
    )
    return code
