"""A canary secret through the whole pipeline: it reaches the child and nothing else."""

from __future__ import annotations

import base64
import io
import json
import sys
import traceback
from pathlib import Path
from urllib.parse import quote

import pytest
from sqlalchemy import MetaData, select

from producer import logs
from producer.audit.sinks import series
from producer.client import Producer
from producer.errors import SpecError
from producer.spec import CommandSpec
from producer.states import State
from tests.conftest import Env, OtlpSink
from tests.conftest import run_cli as cli
from tests.test_worker import Start, wait_for

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
CANARY = "cAnArY-7f3e9b1d2c4a"
# The child prints it raw, base64-encoded and URL-encoded, on both streams, then fails.
LEAK = (
    'echo "token=$CANARY_TOKEN"; echo "$CANARY_TOKEN" >&2; '
    'printf %s "$CANARY_TOKEN" | base64; '
    "echo 'auth: Bearer abcdefghijklmnop1234' >&2; echo 'mail alice@example.com'; exit 3"
)
FORMS = (CANARY, base64.b64encode(CANARY.encode()).decode().rstrip("="), quote(CANARY))


def leaks(text: str) -> list[str]:
    return [form for form in FORMS if form in text]


def dump_store(producer: Producer) -> str:
    """Every row of every table, as text."""
    meta = MetaData()
    meta.reflect(producer.store.engine)
    parts = []
    with producer.store.engine.connect() as conn:
        for table in meta.sorted_tables:
            for row in conn.execute(select(table)):
                parts.append(f"{table.name}: {tuple(row)!r}")
    return "\n".join(parts)


def test_a_canary_secret_reaches_the_child_and_is_found_nowhere_else(
    producer: Producer, workers: Start, env: Env, otlp_sink: OtlpSink
) -> None:
    w = workers("alpha", extra_env=otlp_sink.env())
    producer_log = io.StringIO()
    logs.configure(level="DEBUG", stream=producer_log)
    try:
        # Through the CLI: the secret comes from this shell's environment, never argv.
        submitted = cli(
            env,
            "submit",
            "--tenant",
            "alpha",
            "--secret-env",
            "CANARY_TOKEN",
            "--wait",
            "--json",
            "--",
            "/bin/sh",
            "-c",
            LEAK,
            extra={"CANARY_TOKEN": CANARY, **otlp_sink.env()},
        )
        assert submitted.returncode == 1, submitted.stderr  # the command failed, as it should
        first = json.loads(submitted.stdout)
        # Through the API, retried with the secret passed again.
        spec = CommandSpec(
            tenant="alpha", argv=["/bin/sh", "-c", LEAK], secrets={"CANARY_TOKEN": CANARY}
        )
        second = producer.submit(spec)
        rec = producer.wait(second.id, timeout=30)
        producer.retry(second.id, secrets={"CANARY_TOKEN": CANARY}, reason="again")
        rec = producer.wait(second.id, timeout=30)
    finally:
        logging_root_reset()
    # The child did see it: the stored output shows where it was scrubbed.
    assert rec.state is State.FAILED and rec.exit_code == 3 and rec.redacted
    assert "token=[secret:CANARY_TOKEN]" in (rec.stdout or "")
    assert "[secret:CANARY_TOKEN]" in (rec.stderr or "")
    assert "Bearer [masked:token]" in (rec.stderr or "")
    assert "ali***@***example.com" in (rec.stdout or "")
    status = cli(env, "status", first["id"], "--json")
    exported = cli(env, "audit", "export")
    shown = cli(env, "audit", "show", second.id, "--json")
    audit_files = "".join(p.read_text() for p in series(env.settings.audit_log))  # type: ignore[arg-type]
    wait_for(lambda: len(otlp_sink.spans()) >= 6, 15, "the spans of the runs")
    assert {"execq.submit", "execq.run"} <= {span["name"] for span in otlp_sink.spans()}
    places = {
        "exported spans": "\n".join(str(span) for span in otlp_sink.spans()),
        "the store (every table)": dump_store(producer),
        "the audit file": audit_files,
        "the worker's log": w.output(),
        "the producer's log": producer_log.getvalue(),
        "execq submit": submitted.stdout + submitted.stderr,
        "execq status --json": status.stdout + status.stderr,
        "execq audit export": exported.stdout,
        "execq audit show": shown.stdout,
    }
    assert status.returncode == 0 and json.loads(status.stdout)["redacted"] is True
    assert audit_files and exported.stdout and w.output()
    found = {where: leaks(text) for where, text in places.items() if leaks(text)}
    assert not found, f"the canary leaked into {found}"


def logging_root_reset() -> None:
    logs.configure(level="WARNING", stream=sys.stderr)


def test_an_invalid_spec_error_carries_no_secret_in_its_message_or_traceback() -> None:
    with pytest.raises(SpecError) as info:
        CommandSpec(tenant="alpha", argv=["/bin/echo"], secrets={"A": f"x\x00{CANARY}"})
    text = "".join(traceback.format_exception(info.value))
    assert not leaks(text) and not leaks(repr(info.value.__context__))
