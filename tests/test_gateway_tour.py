"""README's HTTP gateway tour, run for real: its curl block (and the JavaScript and Go
snippets of docs/gateway.md where node and go are installed) against a live `execq gateway`
and a real worker.

The blocks are the fenced code that follows a `<!-- tour: NAME -->` line in README.md or
docs/gateway.md, so neither can drift from what the gateway answers. Nothing is installed:
curl and jq must be there (the tour needs them), node and go are used when present.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from tests.conftest import (
    Env,
    ExecqProc,
    WorkerProc,
    free_port,
    run_cli,
    spawn_execq,
    start_worker,
    wait_for,
)

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
# Where tour blocks live: the curl tour in the README, the other languages in the reference.
TOUR_PAGES = (README, ROOT / "docs" / "gateway.md")
UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"


def block(name: str) -> str:
    """The fenced block that follows `<!-- tour: NAME -->` in README.md or docs/gateway.md."""
    pattern = rf"^<!-- tour: {re.escape(name)} -->\n```\w*\n(.*?)\n```$"
    found = [b for page in TOUR_PAGES for b in re.findall(pattern, page.read_text(), re.S | re.M)]
    assert len(found) == 1, (
        f"README.md and docs/gateway.md need exactly one block marked <!-- tour: {name} -->"
    )
    text: str = found[0]
    return text


def readme_command(setup: str, words: str) -> list[str]:
    """The argv of the setup block's `$ execq WORDS …` line, without `execq`."""
    for line in setup.splitlines():
        if line.startswith(f"$ execq {words} "):
            return shlex.split(line[2:], comments=True)[1:]
    raise AssertionError(f"README's gateway setup block has no `$ execq {words}` line")


def listens(pid: int, port: int) -> bool:
    """Whether process `pid` itself listens on `port` (not some other server on it)."""
    return any(
        c.status == psutil.CONN_LISTEN and c.laddr.port == port
        for c in psutil.Process(pid).net_connections(kind="tcp")
    )


def need(program: str, why: str) -> str:
    """A program the tour cannot do without: its path, or a failure saying so."""
    path = shutil.which(program)
    if path is None:
        pytest.fail(f"{program} is not installed: {why} (the test installs nothing)")
    return path


@dataclass
class Stack:
    """A store, a worker of acme and a gateway, as the README's setup block starts them."""

    env: Env
    url: str
    token: str
    token_name: str
    gateway: ExecqProc
    log: Path

    def shell_env(self, **extra: str) -> dict[str, str]:
        """What a snippet gets: GW and TOKEN, and no execq setting at all."""
        keep = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "TMPDIR")}
        return {**keep, "GW": self.url, "TOKEN": self.token, **extra}

    def submit(self, key: str, body: dict[str, object]) -> str:
        request = urllib.request.Request(
            f"{self.url}/v1/commands",
            data=json.dumps(body).encode(),
            headers={
                "Authorization": f"Bearer {self.token}",
                "Content-Type": "application/json",
                "Idempotency-Key": key,
            },
        )
        with urllib.request.urlopen(request, timeout=10) as answer:
            command_id: str = json.load(answer)["id"]
            return command_id

    def get(self, command_id: str) -> dict[str, object]:
        request = urllib.request.Request(
            f"{self.url}/v1/commands/{command_id}",
            headers={"Authorization": f"Bearer {self.token}"},
        )
        with urllib.request.urlopen(request, timeout=10) as answer:
            record: dict[str, object] = json.load(answer)
            return record


@pytest.fixture
def stack(shipped_env: Env, tmp_path: Path) -> Iterator[Stack]:
    env = shipped_env  # the shipped tenants file, as a newcomer has it: the tour submits as acme
    setup = block("gateway-setup")
    # The token is made by the README's own command line.
    created = run_cli(env, *readme_command(setup, "token create"))
    assert created.returncode == 0, created.stderr
    made = json.loads(created.stdout)
    assert re.fullmatch(r"exq_[0-9A-Za-z]{49}", made["token"]), made
    assert made["id"].startswith("tok_") and made["tenant"] == "acme"

    argv = readme_command(setup, "gateway")
    port = free_port()
    argv[argv.index("--port") + 1] = str(port)
    log = tmp_path / "gateway.log"
    gateway = ExecqProc(spawn_execq(env, argv, log), log)
    worker: WorkerProc | None = None
    try:
        worker = start_worker(env, "acme")
        deadline = time.monotonic() + 30
        while not listens(gateway.proc.pid, port):
            if gateway.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"the gateway did not listen:\n{log.read_text()[-3000:]}")
            time.sleep(0.05)
        yield Stack(env, f"http://127.0.0.1:{port}", made["token"], made["name"], gateway, log)
        assert gateway.proc.poll() is None, f"the gateway died:\n{log.read_text()[-3000:]}"
        assert "Traceback" not in log.read_text(), log.read_text()[-3000:]
    finally:
        gateway.stop(timeout=10)
        if worker is not None:
            worker.stop(signal.SIGKILL, timeout=10)


def in_order(text: str, *patterns: str) -> list[re.Match[str]]:
    """Each pattern found after the previous one's match; the matches."""
    found, at = [], 0
    for pattern in patterns:
        match = re.compile(pattern, re.M).search(text, at)
        assert match, f"{pattern!r} not found after position {at} of:\n{text[at:][:3000]}"
        found.append(match)
        at = match.end()
    return found


def sse_events(text: str) -> list[dict[str, str]]:
    """The events of a text/event-stream, each as its fields (comments and retry left out)."""
    events = []
    for frame in text.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in frame.splitlines() if ": " in line)
        if "event" in fields:
            events.append(fields)
    return events


def test_the_readmes_curl_tour_runs_against_a_live_gateway(stack: Stack) -> None:
    curl = need("curl", "the README's tour is curl commands")
    need("jq", "the README's tour reads ids and cursors with jq")
    version = subprocess.run([curl, "--version"], capture_output=True, text=True, check=True)
    major, minor = re.findall(r"^curl (\d+)\.(\d+)", version.stdout)[0]
    assert (int(major), int(minor)) >= (7, 82), "the tour uses curl --json (7.82 or later)"

    done = subprocess.run(
        # -x: the commands go to stderr as they run (where the tour stopped, if it does).
        ["bash", "-x", "-euo", "pipefail", "-c", block("gateway")],
        capture_output=True,
        text=True,
        env=stack.shell_env(),
        timeout=60,
        check=False,
    )
    out = done.stdout
    assert done.returncode == 0, f"the tour stopped (exit {done.returncode}):\n{done.stderr}\n{out}"

    _, _, location, first, repeat = in_order(
        out,
        r'^\{"status":"ok"\} 200$',
        r"^HTTP/1.1 201 Created\r?$",
        rf"^location: /v1/commands/({UUID})\r?$",
        rf'^\{{"id":"({UUID})","state":"pending","duplicate":false\}}$',
        rf'^\{{"id":"({UUID})","state":"\w+","duplicate":true\}} 200$',
    )
    command_id = location.group(1)
    assert first.group(1) == repeat.group(1) == command_id
    actions = [json.loads(line) for line in out.splitlines() if line.startswith('{"name":')]
    assert {a["name"] for a in actions} == {"greet", "make-dir", "clean-dir"}
    assert {"name": "greet", "params": ["count", "name"]} in actions

    # The followed events: every one has an id, the output comes in order, `end` is last
    # and carries the final record.
    stream_at = out.index("retry: 1000")
    stream_end = out.index("\n\n", out.index("event: end", stream_at)) + 2
    events = sse_events(out[stream_at:stream_end])
    assert all(e.get("id") for e in events), events
    assert [e["event"] for e in events][-1] == "end"
    stdout = "".join(json.loads(e["data"])["text"] for e in events if e["event"] == "stdout")
    assert stdout == "step 1\nstep 2\nstep 3\n"
    states = [json.loads(e["data"])["state"] for e in events if e["event"] == "state"]
    assert states[-1] == "succeeded"
    final = json.loads(events[-1]["data"])
    assert final["id"] == command_id and final["state"] == "succeeded" and final["exit_code"] == 0
    assert final["principal"] == stack.token_name  # the token's name is who asked

    after = out[stream_end:]
    *_, refused, page1, page2 = in_order(
        after,
        r'^\{"state":"(running|revoked|pending)","cancel_requested":(true|false)\}$',
        r'^\{"error":"[^"]*"\} 401$',
        r'^\{"error":"[^"]*"\} 404$',
        r'^\{"error":"[^"]*"\} 409$',
        rf'^\{{"error":"[^"]*","command_id":"{command_id}"\}} 422$',
        rf'^\{{"error":"[^"]*","command_id":"({UUID})","rule":"executables"\}} 403$',
        r"^\[.*\]$",
        r"^\{.*\}$",
    )
    # Newest first: the refused command, then the sleep (revoked, or still being killed).
    newest, second = json.loads(page1.group(0))
    assert newest == "rejected" and second in ("revoked", "running")
    assert json.loads(page2.group(0)) == {"states": ["succeeded"], "next_cursor": None}

    # What the tour says happened did happen.
    assert stack.get(refused.group(1))["state"] == "rejected"
    nap = re.findall(r"^\+ NAP=(\S+)$", done.stderr, re.M)
    assert len(nap) == 1, done.stderr
    wait_for(
        lambda: stack.get(nap[0])["state"] == "revoked",
        timeout=15,
        what="the revoked sleep to be recorded revoked",
    )
    # `execq logs ID -f`, which the README offers for a terminal, prints the same output.
    logs = run_cli(stack.env, "logs", command_id, "-f", timeout=30)
    assert logs.returncode == 0, logs.stderr
    assert logs.stdout == "step 1\nstep 2\nstep 3\n"


@pytest.fixture
def node() -> str:
    """node, 18 or later (fetch); the test is skipped without it (requested before the stack,
    so nothing is started for a skipped test)."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed: the JavaScript snippets of docs/gateway.md are not run")
    version = subprocess.run([node, "--version"], capture_output=True, text=True, check=True)
    if int(version.stdout.strip().lstrip("v").split(".")[0]) < 18:
        pytest.skip(f"node {version.stdout.strip()} has no fetch: the snippets need 18 or later")
    return node


def test_the_readmes_javascript_fetch_snippet_submits_and_follows(
    node: str, stack: Stack, tmp_path: Path
) -> None:
    script = tmp_path / "tour.mjs"
    script.write_text(block("gateway-js"))
    done = subprocess.run(
        [node, str(script)],
        capture_output=True,
        text=True,
        env=stack.shell_env(),
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "hello web 2\nstate: succeeded\n"


@pytest.fixture
def eventsource(node: str) -> Path:
    """The eventsource npm package (3 or later) as node finds it from the repository."""
    where = subprocess.run(
        [node, "-p", "require.resolve('eventsource/package.json')"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    if where.returncode != 0:
        pytest.skip(
            "the eventsource npm package (version 3) is not installed where node finds it "
            "from the repository or NODE_PATH (npm install eventsource@3); the test installs "
            "nothing"
        )
    package = Path(where.stdout.strip())
    if int(json.loads(package.read_text())["version"].split(".")[0]) < 3:
        pytest.skip("the eventsource npm package is older than 3: it has no fetch option")
    return package.parent.parent


def test_the_readmes_eventsource_snippet_follows_with_the_token(
    node: str, eventsource: Path, stack: Stack, tmp_path: Path
) -> None:
    # An ES module finds packages from its own directory: give it the ones node found.
    (tmp_path / "node_modules").symlink_to(eventsource)
    command_id = stack.submit("follow-1", {"action": "greet", "params": {"name": "es"}})
    script = tmp_path / "follow.mjs"
    script.write_text(block("gateway-eventsource"))
    done = subprocess.run(
        [node, str(script), command_id],
        capture_output=True,
        text=True,
        env=stack.shell_env(),
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "hello es 1\nstate: succeeded\n"


@pytest.fixture
def go() -> str:
    found = shutil.which("go")
    if found is None:
        pytest.skip("go is not installed: the Go snippet of docs/gateway.md is not run")
    return found


def test_the_readmes_go_snippet_submits_and_follows(go: str, stack: Stack, tmp_path: Path) -> None:
    source = tmp_path / "tour.go"
    source.write_text(block("gateway-go"))
    done = subprocess.run(
        [go, "run", str(source)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=stack.shell_env(
            GOCACHE=str(tmp_path / "gocache"),
            GOPATH=str(tmp_path / "gopath"),
            # The toolchain that is installed, never one fetched over the network.
            GOTOOLCHAIN="local",
        ),
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "hello go 1\nstate: succeeded\n"
