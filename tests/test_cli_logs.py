"""`execq logs` against a real worker: output as the command prints it, without its secrets,
resumable, capped; exit statuses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote

import pytest
import redis

from producer.live import follow
from producer.spec import CommandSpec
from producer.states import State
from producer.store.db import make_engine
from producer.store.migrate import upgrade
from tests.conftest import PYTHON, Env, WorkerProc, run_cli
from workers.live import cut_marker

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "s3cr3t/Live-7f3e9b1d"
FORMS = (TOKEN, quote(TOKEN, safe=""), json.dumps(TOKEN)[1:-1].replace("/", "\\/"))
# A line, then (once the test says go) the secret in two writes a flush apart, its JSON form
# on stderr, a last line; then it fails.
SCRIPT = """
import json, os, sys, time
print("first", flush=True)
while not os.path.exists(sys.argv[1]):
    time.sleep(0.02)
token = os.environ["TOKEN"]
sys.stdout.write("token=" + token[:7]); sys.stdout.flush()
time.sleep(0.3)
sys.stdout.write(token[7:] + "\\n"); sys.stdout.flush()
print(json.dumps({"t": token}).replace("/", "\\\\/"), file=sys.stderr, flush=True)
print("second", flush=True)
sys.exit(3)
"""


@pytest.fixture
def env(make_env: Callable[..., Env], redis_url: str, tmp_path: Path) -> Env:
    built = make_env(f"sqlite:///{tmp_path}/logs.db", redis_url)
    upgrade(make_engine(built.settings.database_url))
    return built


def logs(env: Env, *args: str) -> subprocess.Popen[str]:
    """`execq logs ARGS…` with its stdout and stderr pipes (not a terminal)."""
    return subprocess.Popen(
        [sys.executable, "-m", "workers.cli", "logs", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, **env.vars},
    )


def stream_text(env: Env, command_id: str) -> str:
    client = redis.Redis.from_url(env.settings.broker_url, decode_responses=True)
    try:
        return "".join(f["text"] for _, f in client.xrange(env.settings.key("live", command_id)))
    finally:
        client.close()


def test_logs_follow_prints_each_line_as_it_is_printed_and_never_the_secret(
    env: Env, workers: Callable[..., WorkerProc], tmp_path: Path
) -> None:
    workers("alpha")
    go = tmp_path / "go"
    with env.producer() as producer:
        submitted = producer.submit(
            CommandSpec(
                tenant="alpha", argv=[PYTHON, "-c", SCRIPT, str(go)], secrets={"TOKEN": TOKEN}
            )
        )
        tail = logs(env, submitted.id, "-f")
        assert tail.stdout is not None
        # The command waits for `go` before it prints anything else.
        assert tail.stdout.readline() == "first\n"
        go.touch()
        out, err = tail.communicate(timeout=60)
        assert tail.returncode == 1, err  # the command failed
        assert out == "token=[secret:TOKEN]\nsecond\n"
        assert "[secret:TOKEN]" in err
        published = stream_text(env, submitted.id)
        assert published.count("[secret:TOKEN]") == 2
        assert not [f for f in FORMS if f in out + err + published]
        rec = producer.get(submitted.id)
        assert rec.state is State.FAILED and rec.exit_code == 3

        # Resumed after any event, the rest of them and nothing else.
        whole = list(follow(producer, submitted.id))
        assert [e.event for e in whole][-2:] == ["state", "end"]
        for i, event in enumerate(whole):
            assert list(follow(producer, submitted.id, after=event.id)) == whole[i + 1 :]

    as_json = run_cli(env, "logs", submitted.id, "--json")
    lines = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert as_json.returncode == 0 and [line["id"] for line in lines] == [e.id for e in whole]
    assert lines[-1]["event"] == "end" and lines[-1]["data"]["state"] == "failed"


def test_logs_exit_statuses_stored_output_and_the_cap(
    env: Env, workers: Callable[..., WorkerProc]
) -> None:
    workers("alpha")
    big = "import sys\nfor i in range(4000): sys.stdout.write(f'{i:06d}' + 'x' * 43 + '\\n')"
    with env.producer() as producer:
        hello = producer.submit(CommandSpec(tenant="alpha", argv=["/bin/echo", "hello"]))
        flood = producer.submit(CommandSpec(tenant="alpha", argv=[PYTHON, "-c", big]))
        tail = logs(env, hello.id, "--follow")
        out, err = tail.communicate(timeout=60)
        assert (tail.returncode, out) == (0, "hello\n"), err
        stored = producer.wait(flood.id, timeout=30)

    # 200,000 bytes printed: the stream stops at the tenant's output_kb, the store has the tail.
    published = stream_text(env, flood.id)
    cap = 64 * 1024
    assert published.startswith("000000" + "x" * 43 + "\n")
    assert published.endswith(cut_marker(cap)) and len(published) <= cap + len(cut_marker(cap))
    assert (stored.stdout or "").endswith("003999" + "x" * 43 + "\n")

    shown = run_cli(env, "logs", hello.id)
    assert (shown.returncode, shown.stdout) == (0, "hello\n")
    unknown = run_cli(env, "logs", "00000000-0000-4000-8000-000000000000")
    assert unknown.returncode == 1 and "00000000-0000-4000-8000-000000000000" in unknown.stderr
