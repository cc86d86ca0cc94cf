"""The HTTP gateway killed while clients submit through it and follow their commands.

The scenario's set-up starts `execq gateway` as a real process on a loopback port of its own,
with the stack's settings and a token of the chaos tenant. While the usual stream runs
through the Python API, the injector submits more commands over HTTP from a few client
threads (each with an `Idempotency-Key`, each leaving a marker like the stream's) and
follows half of them (at most 100) through `GET /v1/commands/{id}/events`. Mid-way the
gateway gets SIGKILL and a new one starts on the same port; the clients do what a real
client does: a submit that got no answer is sent again with the same key, a stream that
broke is reopened with `Last-Event-ID`.

Every accepted command joins the stream's list, so the end checks (lost, duplicated, audit,
leaks) cover them. The streams are checked here: per command, no event id twice, ids in
order, one `end` last, and the output exactly what the command printed, once.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import httpx

from chaos.load import Accepted, marker_argv
from chaos.servers import free_port
from chaos.stack import ROOT, TENANT, Stack, WorkerError
from producer.errors import InvalidEventId
from producer.live import Cursor
from workers.cli_gateway import SHUTDOWN_GRACE_S

if TYPE_CHECKING:
    from chaos.scenarios import Run

HOST = "127.0.0.1"
CLIENTS = 4  # threads submitting over HTTP
HTTP_RATE_PER_S = 16.0
FOLLOW_EVERY = 2  # one HTTP command in two is followed, up to FOLLOWED_MAX streams in all
# Every open stream reads the store twice a second through the gateway's thread pool: a few
# hundred at once saturate a 2-vCPU host (the full run's 500 did not all end within 120 s),
# which is a capacity figure (docs/gateway.md), not what this scenario is about.
FOLLOWED_MAX = 100
RETRY_SAFE_EVERY = 4
LINES = 5  # what each HTTP command prints, a line every LINE_S
LINE_S = 0.1
RETRY_PAUSE_S = 0.2
REPLAYS = 5  # commands accepted just before a kill, submitted again after it
READ_TIMEOUT_S = 30.0  # longer than the gateway's 15 s keep-alive comments


def expected_output() -> str:
    return "".join(f"out-{n}\n" for n in range(1, LINES + 1))


def http_argv(markers: Path, label: str) -> list[str]:
    """The stream's marker command, then a few lines of output spread over ~0.75 s, so that
    a kill finds streams mid-output."""
    argv = marker_argv(markers, label, 0.0)
    loop = " ".join(str(n) for n in range(1, LINES + 1))
    argv[-1] += f"; for n in {loop}; do echo out-$n; sleep {LINE_S}; done"
    return argv


class GatewayProc:
    """`execq gateway` on a fixed loopback port, with the stack's environment."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.port = free_port()
        self.base = f"http://{HOST}:{self.port}"
        self.log = stack.root / "gateway.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self, ready_timeout_s: float = 60.0) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "workers.cli", "gateway",
                 "--host", HOST, "--port", str(self.port)],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.stack.env(),
                cwd=ROOT,
                start_new_session=True,
            )  # fmt: skip
        self.starts += 1
        deadline = time.monotonic() + ready_timeout_s
        while not self._healthy():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise WorkerError(f"execq gateway did not start:\n{self.output()[-3000:]}")
            time.sleep(0.1)

    def _healthy(self) -> bool:
        try:
            return httpx.get(f"{self.base}/healthz", timeout=1.0).status_code == 200
        except httpx.HTTPError:
            return False

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def output(self) -> str:
        with contextlib.suppress(OSError):
            return self.log.read_text(errors="replace")
        return ""

    def kill(self) -> None:
        """SIGKILL (its whole session: it starts nothing else, but be sure)."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                self.proc.send_signal(signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
        self.proc = None

    def stop(self, grace_s: float = 10.0) -> bool:
        """SIGTERM, as a service manager stops it; False if it was still running after
        `grace_s` (then killed)."""
        if self.proc is None or self.proc.poll() is not None:
            self.proc = None
            return True
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            self.kill()
            return False
        self.proc = None
        return True


@dataclass
class Gateway:
    """The scenario's gateway and its token."""

    proc: GatewayProc
    token: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


# The running scenario's gateway, by stack: the set-up makes it, the injector uses it.
_GATEWAYS: dict[Path, Gateway] = {}


@contextmanager
def gateway_setup(stack: Stack) -> Iterator[Gateway]:
    """Migrate the store (the gateway and `execq token create` need it; the scenario's own
    upgrade after this is a no-op), make a token, start the gateway; kill it on the way out."""
    stack.upgrade()
    done = stack.cli(
        "token", "create", "--tenant", TENANT, "--scope", "submit,read",
        "--name", "chaos-gateway", "--json",
    )  # fmt: skip
    if done.returncode != 0:
        raise WorkerError(f"execq token create failed: {done.stderr[-2000:]}")
    token = str(json.loads(done.stdout)["token"])
    proc = GatewayProc(stack)
    gateway = Gateway(proc, token)
    _GATEWAYS[stack.root] = gateway
    try:
        proc.start()
        yield gateway
    finally:
        _GATEWAYS.pop(stack.root, None)
        proc.kill()


@dataclass
class Followed:
    """One command's stream as its client saw it, over every connection."""

    label: str
    id: str
    events: list[tuple[str, str, str]] = field(default_factory=list)  # id, event, data
    opens: int = 0
    breaks: list[int] = field(default_factory=list)  # events seen when a connection broke

    def mid_output(self) -> bool:
        """Whether a connection broke between two chunks of output (the resume that matters
        most: the rest of the output came over the next connection)."""
        kinds = [e[1] for e in self.events]
        return any("stdout" in kinds[:at] and "stdout" in kinds[at:] for at in self.breaks if at)

    error: str | None = None

    def problems(self) -> list[str]:
        """Lost, repeated or out-of-order output, judged by the event ids (cursors)."""
        where = f"stream of {self.id} ({self.label})"
        if self.error is not None:
            return [f"{where}: {self.error}"]
        out: list[str] = []
        ids = [e[0] for e in self.events]
        repeated = [i for i, n in Counter(ids).items() if n > 1]
        if repeated:
            out.append(f"{where}: event ids repeated after a resume: {repeated[:3]}")
        try:
            keys = [_order(i) for i in ids]
        except InvalidEventId as exc:
            return [*out, f"{where}: {exc}"]
        if any(b <= a for a, b in itertools.pairwise(keys)):
            out.append(f"{where}: event ids out of order: {ids}")
        ends = [e for e in self.events if e[1] == "end"]
        last = self.events[-1][1] if self.events else None
        if len(ends) != 1 or last != "end":
            out.append(f"{where}: {len(ends)} end event(s), last event {last!r}")
            return out
        text = "".join(json.loads(e[2])["text"] for e in self.events if e[1] == "stdout")
        attempts = int(json.loads(ends[0][2]).get("attempts") or 1)
        # each attempt appends to the same stream; stored output (no stream) is the last one
        if text not in (expected_output(), expected_output() * attempts):
            out.append(f"{where}: output {text!r}, printed {expected_output()!r}")
        return out


def _order(event_id: str) -> tuple[int, int, int, bool]:
    cursor = Cursor.parse(event_id)
    ms, _, seq = cursor.entry.partition("-")
    return cursor.version, int(ms), int(seq), cursor.ended


def _frames(lines: Iterator[str]) -> Iterator[dict[str, str]]:
    """text/event-stream frames as field -> value (comments and `retry:` included)."""
    frame: dict[str, str] = {}
    for line in lines:
        if not line:
            if frame:
                yield frame
            frame = {}
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        frame[name] = value.removeprefix(" ")


@dataclass
class HttpLoad:
    """The HTTP clients: submits (retried with the same key until answered) and streams
    (reopened from the last event id until `end`)."""

    run: Run
    gateway: Gateway
    n: int
    deadline: float  # time.monotonic()
    progress: int = 0
    submits: Counter[str] = field(default_factory=Counter)  # what the answers were
    followed: list[Followed] = field(default_factory=list)
    # accepted HTTP commands in order: label, body, id (a replay sends the same again)
    sent: list[tuple[str, dict[str, object], str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._stop = threading.Event()  # the scenario is over (or interrupted): give up
        self._streams = ThreadPoolExecutor(max_workers=32, thread_name_prefix="chaos-sse")
        self._futures: list[Future[None]] = []
        self._threads = [
            threading.Thread(target=self._client, args=(k,), name=f"chaos-http-{k}", daemon=True)
            for k in range(CLIENTS)
        ]
        self._tag = f"{self.run.rng.getrandbits(32):08x}"
        self.follow_every = max(FOLLOW_EVERY, -(-self.n // FOLLOWED_MAX))

    def start(self) -> None:
        self._t0 = time.monotonic()
        for t in self._threads:
            t.start()

    def _going(self) -> bool:
        return not self._stop.is_set() and time.monotonic() < self.deadline

    def close(self) -> None:
        """Stop every client thread (they notice within a retry pause, or when their
        connection breaks as the gateway goes)."""
        self._stop.set()
        self._streams.shutdown(wait=False, cancel_futures=True)

    def submitting(self) -> bool:
        return any(t.is_alive() for t in self._threads)

    def open_streams(self) -> int:
        return sum(not f.done() for f in self._futures)

    def mid_output(self) -> int:
        """Streams that have had output and not yet their end."""
        with self._lock:
            followed = list(self.followed)
        return sum(
            1
            for f in followed
            if any(e[1] == "stdout" for e in f.events) and f.events[-1][1] != "end"
        )

    def replay(self, sent: list[tuple[str, dict[str, object], str]]) -> list[str]:
        """Submit these again, as a client that never got their answers does: each must be
        `200` with `duplicate` and the id first given. Problems found."""
        out: list[str] = []
        with httpx.Client(base_url=self.gateway.proc.base, timeout=5.0) as client:
            for label, body, command_id in sent:
                headers = {**self.gateway.headers, "Idempotency-Key": label}
                try:
                    answer = client.post("/v1/commands", json=body, headers=headers)
                except httpx.TransportError as exc:
                    out.append(f"replay of {label}: no answer ({type(exc).__name__})")
                    continue
                self._count(f"replayed {answer.status_code}")
                data = answer.json() if answer.status_code in (200, 201) else {}
                if (answer.status_code, data.get("id"), data.get("duplicate")) != (
                    200,
                    command_id,
                    True,
                ):
                    out.append(
                        f"replay of {label} ({command_id}) answered {answer.status_code} "
                        f"{answer.text[:200]}"
                    )
        return out

    def join_submits(self) -> None:
        for t in self._threads:
            t.join(max(0.0, self.deadline - time.monotonic()))

    def join_streams(self, until: float) -> int:
        """Wait for every stream to end (bounded); how many were still open."""
        for f in list(self._futures):
            try:
                f.result(timeout=max(0.0, until - time.monotonic()))
            except TimeoutError:
                pass
            except Exception as exc:  # a client's own failure: judged, not raised
                self.run.faults.problems.append(f"stream client failed: {exc!r}")
        left = sum(not f.done() for f in self._futures)
        return left

    def _client(self, k: int) -> None:
        with httpx.Client(base_url=self.gateway.proc.base, timeout=5.0) as client:
            for i in range(k, self.n, CLIENTS):
                if (delay := self._t0 + i / HTTP_RATE_PER_S - time.monotonic()) > 0:
                    self._stop.wait(delay)
                if not self._going():
                    return
                self._submit(client, i)
                with self._lock:
                    self.progress += 1

    def _submit(self, client: httpx.Client, i: int) -> None:
        label = f"g{i:05d}-{self._tag}"
        retry_safe = i % RETRY_SAFE_EVERY == 0
        body = {
            "argv": http_argv(self.run.stack.markers, label),
            "retry_safe": retry_safe,
            "timeout_s": 20,
        }
        headers = {**self.gateway.headers, "Idempotency-Key": label}
        while self._going():
            try:
                answer = client.post("/v1/commands", json=body, headers=headers)
            except httpx.TransportError as exc:
                # no answer (refused, reset, cut mid-answer): the same request again
                self._count(f"no answer ({type(exc).__name__})")
                self._stop.wait(RETRY_PAUSE_S)
                continue
            self._count(str(answer.status_code))
            if answer.status_code in (200, 201):
                data = answer.json()
                accepted = Accepted(label, str(data["id"]), retry_safe, time.time())
                self.run.stream.accepted.append(accepted)
                self.sent.append((label, body, accepted.id))
                if i % self.follow_every == 0:
                    self._futures.append(self._streams.submit(self._follow, label, accepted.id))
                return
            if answer.status_code == 429 or answer.status_code >= 500:
                self._stop.wait(float(answer.headers.get("Retry-After") or RETRY_PAUSE_S))
                continue
            self.run.faults.problems.append(
                f"gateway refused {label}: {answer.status_code} {answer.text[:200]}"
            )
            return
        self.run.stream.given_up.append(label)

    def _count(self, what: str) -> None:
        with self._lock:
            self.submits[what] += 1

    def _follow(self, label: str, command_id: str) -> None:
        seen = Followed(label, command_id)
        with self._lock:
            self.followed.append(seen)
        url = f"/v1/commands/{command_id}/events"
        timeout = httpx.Timeout(5.0, read=READ_TIMEOUT_S)
        with httpx.Client(base_url=self.gateway.proc.base, timeout=timeout) as client:
            while self._going():
                headers = dict(self.gateway.headers)
                if seen.events:
                    headers["Last-Event-ID"] = seen.events[-1][0]
                try:
                    if self._read(client, url, headers, seen):
                        return
                except httpx.TransportError:
                    seen.breaks.append(len(seen.events))
                self._stop.wait(RETRY_PAUSE_S)
                if seen.error is not None:
                    return
        seen.error = seen.error or "no end before the deadline"

    def _read(
        self, client: httpx.Client, url: str, headers: dict[str, str], seen: Followed
    ) -> bool:
        """One connection: True once `end` came."""
        with client.stream("GET", url, headers=headers) as answer:
            seen.opens += 1
            if answer.status_code != 200:
                answer.read()
                if answer.status_code not in (429, 503) and answer.status_code < 500:
                    seen.error = f"{answer.status_code} {answer.text[:200]}"
                return False
            for frame in _frames(answer.iter_lines()):
                if "id" not in frame:
                    continue
                seen.events.append((frame["id"], frame.get("event", ""), frame.get("data", "")))
                if frame.get("event") == "end":
                    return True
        # the gateway closed the stream without `end`: reopen from the last id
        seen.breaks.append(len(seen.events))
        return False


def kill_gateway(run: Run) -> None:
    """SIGKILL the gateway at 40 % of the HTTP submits (and at 75 % in the full run), start a
    new one on the same port at once, submit the last few commands again with their keys,
    check the streams once every command ended, stop the gateway (SIGTERM)."""
    gateway = _GATEWAYS[run.stack.root]
    # a quarter of the stream again over HTTP: each prints for half a second, and the full
    # run's 1,000 kept the four pool slots busy for minutes after the last submit, so its
    # followers waited on pending commands past the scenario's 120 s
    n = max(20, run.opts.commands // 4)
    load = HttpLoad(run, gateway, n, run.stream.deadline)
    load.start()
    try:
        _kill_and_follow(run, gateway, load)
    finally:
        load.close()
    _stop_while_streaming(run, gateway, load)


def _stop_while_streaming(run: Run, gateway: Gateway, load: HttpLoad) -> None:
    """SIGTERM the gateway while a client follows a command that does not end by itself (it
    waits for a file): the gateway must still stop within its grace. The command is not one
    of the checked stream's (it leaves no marker) and ends once the file is there."""
    release = run.stack.root / "linger-release"
    argv = [
        "/bin/sh",
        "-c",
        f"i=0; while [ ! -e {release} ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done",
    ]
    opened = threading.Event()
    headers = {**gateway.headers, "Idempotency-Key": f"linger-{load._tag}"}
    try:
        made = httpx.post(
            f"{gateway.proc.base}/v1/commands", json={"argv": argv}, headers=headers, timeout=10
        )
        command_id = str(made.json()["id"])
    except (httpx.HTTPError, KeyError, ValueError) as exc:
        run.faults.problems.append(f"could not submit the lingering command: {exc!r}")
        command_id = ""

    def linger() -> None:
        url = f"{gateway.proc.base}/v1/commands/{command_id}/events"
        with (
            contextlib.suppress(httpx.HTTPError),
            httpx.stream("GET", url, headers=gateway.headers, timeout=READ_TIMEOUT_S) as answer,
        ):
            for line in answer.iter_lines():
                if line.startswith("event: state"):
                    opened.set()

    reader = threading.Thread(target=linger, name="chaos-sse-linger", daemon=True)
    if command_id:
        reader.start()
        opened.wait(10)
    t0 = time.monotonic()
    grace_s = SHUTDOWN_GRACE_S + 5
    stopped = gateway.proc.stop(grace_s=grace_s)
    took = time.monotonic() - t0
    release.touch()
    run.faults.note(f"gateway stopped (SIGTERM) in {took:.1f} s, a stream open: {opened.is_set()}")
    if not stopped:
        run.faults.problems.append(
            f"the gateway did not stop within {grace_s} s of SIGTERM (an event stream was open)"
        )
    reader.join(5)


def _kill_and_follow(run: Run, gateway: Gateway, load: HttpLoad) -> None:
    n = load.n
    down_s = 0.5 if run.opts.short else 2.0
    for fraction in (0.4,) if run.opts.short else (0.4, 0.75):
        while load.progress < fraction * n and load.submitting():
            time.sleep(0.02)
        # a kill between two lines of a command's output is the resume that matters most
        wait_until = time.monotonic() + 10.0
        while not load.mid_output() and time.monotonic() < wait_until:
            time.sleep(0.02)
        open_streams, mid = load.open_streams(), load.mid_output()
        before = list(load.sent[-REPLAYS:])
        pid = gateway.proc.pid
        gateway.proc.kill()
        run.faults.note(
            f"SIGKILL gateway {pid} after {load.progress}/{n} HTTP submits, "
            f"{open_streams} stream(s) open, {mid} mid-output"
        )
        time.sleep(down_s)
        t0 = time.monotonic()
        gateway.proc.start()
        run.faults.end = time.time()
        run.faults.note(
            f"new gateway {gateway.proc.pid} serving after {time.monotonic() - t0:.1f} s"
        )
        # the last answers before the kill might never have reached their clients
        run.faults.problems.extend(load.replay(before))
    load.join_submits()
    left = load.join_streams(min(run.stream.deadline, time.monotonic() + run.opts.settle_s))
    if left:
        run.faults.problems.append(f"timeout: {left} HTTP stream(s) still open")
    _judge(run, load)


def _judge(run: Run, load: HttpLoad) -> None:
    resumed = [f for f in load.followed if any(f.breaks)]
    mid = sum(f.mid_output() for f in load.followed)
    events = sum(len(f.events) for f in load.followed)
    run.faults.note(
        f"HTTP submits: {dict(load.submits)}; {len(load.followed)} stream(s), "
        f"{len(resumed)} resumed from their last event id ({mid} between two lines of "
        f"output), {events} events"
    )
    for f in load.followed:
        run.faults.problems.extend(f.problems())
