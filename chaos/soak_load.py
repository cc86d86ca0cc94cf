"""The soak's load: a paced stream of mixed submissions (plain commands, actions, failures
that roll back, timeouts, revokes and sagas) through the Python API, and what each kind
must have become once everything settled."""

from __future__ import annotations

import queue
import random
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

from chaos.stack import TENANT
from producer.client import Producer
from producer.spec import CommandSpec

REVOKE_AFTER_S = 0.3  # long enough to find some commands running, some still pending
RESUBMIT_PAUSE_S = 0.2
# Per 100 submissions. Timeouts and revokes hold a pool slot for a while, so they are rare;
# a saga is one submission of three commands.
MIX: dict[str, int] = {
    "ok": 56,
    "action": 20,
    "rollback": 10,
    "rollback_action": 5,
    "timeout": 1,
    "revoke": 2,
    "saga_ok": 3,
    "saga_fail": 3,
}


def tenants_yaml(concurrency: int) -> str:
    """The soak tenant: cheap programs, an action that succeeds and one that fails and is
    undone by its compensation."""
    return f"""tenants:
  {TENANT}:
    concurrency: {concurrency}
    executables: [/bin/true, /bin/false, /bin/echo, /bin/sleep, /bin/sh]
    max_attempts: 3
    limits: {{timeout_s: 30, cpu_s: 10, memory_mb: 256, processes: 64, output_kb: 16,
              file_mb: 4}}
    actions:
      greet:
        argv: ["/bin/echo", "hello {{name}}", "{{count}}"]
        params:
          name: {{type: string, pattern: "^[a-z]{{1,20}}$"}}
          count: {{type: integer, minimum: 1, maximum: 5}}
      fail-undo:
        argv: ["/bin/sh", "-c", "exit {{code}}"]
        params:
          code: {{type: integer, minimum: 1, maximum: 9}}
        compensate: ["/bin/echo", "undo {{code}}"]
        rollback_on_failure: true
"""


def prime(producer: Producer, slots: int, timeout_s: float = 120.0) -> int:
    """Occupy every pool slot twice with a command that prints and sleeps, and wait for
    them: each pool process makes its cgroups, connections and pipes on its first commands,
    which a slope judged from the start would take for a leak. The commands primed."""
    ids = [
        producer.submit(
            CommandSpec(tenant=TENANT, argv=["/bin/sh", "-c", "echo primed; sleep 0.3"])
        ).id
        for _ in range(2 * slots)
    ]
    deadline = time.monotonic() + timeout_s
    for command_id in ids:
        producer.wait(command_id, timeout=max(1.0, deadline - time.monotonic()))
    return len(ids)


def _step(argv: list[str], undo: bool = True) -> dict[str, object]:
    return {"argv": argv, "compensate": ["/bin/echo", "undo"] if undo else None}


@dataclass(frozen=True)
class Sent:
    """One accepted submission: its kind, its command id (a saga: its batch id)."""

    kind: str
    id: str
    at: float  # time.monotonic()


@dataclass
class SoakLoad:
    """Submits at `rate_per_s` for `duration_s` from a thread of its own; a revoke thread
    cancels the `revoke` kind's commands REVOKE_AFTER_S after they were accepted."""

    producer: Producer
    revoker: Producer  # a client of its own: the revoke thread shares nothing with submits
    rate_per_s: float
    duration_s: float
    seed: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    revoke_errors: Counter[str] = field(default_factory=Counter)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)  # noqa: S311 - reproducible load, not secrets
        # 16 bytes per accepted id, by kind: a list of records would grow the submitting
        # process by ~25 MB in 30 minutes, which its RSS slope would then show as a leak
        self._ids: dict[str, bytearray] = {k: bytearray() for k in MIX}
        self.accepted = 0
        self._kinds = [k for k, n in MIX.items() for _ in range(n)]
        self._revokes: queue.Queue[Sent | None] = queue.Queue()
        self._threads = [
            threading.Thread(target=self._submit_loop, name="soak-submit", daemon=True),
            threading.Thread(target=self._revoke_loop, name="soak-revoke", daemon=True),
        ]
        self.submitted = 0  # read by the sampler: the backlog is submitted minus finished
        self.started_at = 0.0
        self.lag_s = 0.0  # how far behind its schedule the submit thread is
        self.ended_at = 0.0

    def start(self) -> None:
        self.started_at = time.monotonic()
        for t in self._threads:
            t.start()

    def join(self, timeout_s: float) -> bool:
        """Wait for the last submit and revoke; False if still busy after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in self._threads)

    def sent(self) -> Iterator[tuple[str, str]]:
        """(kind, id) of every accepted submission (a saga's id is its batch's)."""
        for kind, packed in self._ids.items():
            for at in range(0, len(packed), 16):
                yield kind, str(uuid.UUID(bytes=bytes(packed[at : at + 16])))

    def _submit_loop(self) -> None:
        run = f"{self._rng.getrandbits(32):08x}"
        t0 = self.started_at
        i = 0
        # paced by a schedule, not by sleeps after each submit: a slow moment is caught up
        # with a burst, and a producer that cannot keep up shows as a lower achieved rate
        end = t0 + self.duration_s
        # the run lasts duration_s whatever the producer manages: a producer slower than the
        # rate submits fewer commands (achieved_rate says so), it does not stretch the run
        while (due := t0 + i / self.rate_per_s) < end and time.monotonic() < end:
            if (delay := due - time.monotonic()) > 0:
                time.sleep(delay)
            self.lag_s = max(0.0, -delay)
            kind = self._rng.choice(self._kinds)
            sent = self._send(kind, f"s{i:07d}-{run}")
            if sent is not None:
                self._ids[kind] += uuid.UUID(sent.id).bytes
                self.accepted += 1
                if kind == "revoke":
                    self._revokes.put(sent)
            i += 1
            self.submitted = i
        self.ended_at = time.monotonic()
        self._revokes.put(None)

    def _send(self, kind: str, key: str) -> Sent | None:
        for _ in range(50):  # a store or broker hiccup: the same key again, as a client would
            try:
                return Sent(kind, self._submit(kind, key), time.monotonic())
            except Exception as exc:
                self.errors[f"{kind}:{type(exc).__name__}"] += 1
                time.sleep(RESUBMIT_PAUSE_S)
        return None

    def _submit(self, kind: str, key: str) -> str:
        p, rng = self.producer, self._rng
        if kind.startswith("saga"):
            last = ["/bin/false"] if kind == "saga_fail" else ["/bin/true"]
            steps = [_step(["/bin/true"]), _step(["/bin/echo", "two"]), _step(last, undo=False)]
            return p.submit_batch(TENANT, steps, idempotency_key=key).id
        spec: dict[str, object] = {"tenant": TENANT, "idempotency_key": key}
        if kind == "ok":
            spec["argv"] = ["/bin/true"]
        elif kind == "action":
            name = "".join(rng.choice("abcdefgh") for _ in range(6))
            spec.update(action="greet", params={"name": name, "count": rng.randint(1, 5)})
        elif kind == "rollback":
            spec.update(
                argv=["/bin/false"], compensate=["/bin/echo", "undo"], rollback_on_failure=True
            )
        elif kind == "rollback_action":
            spec.update(action="fail-undo", params={"code": rng.randint(1, 9)})
        elif kind == "timeout":
            spec.update(argv=["/bin/sleep", "5"], timeout_s=0.5)
        elif kind == "revoke":
            spec.update(argv=["/bin/sleep", "5"])
        else:
            raise ValueError(f"unknown kind {kind}")
        return p.submit(CommandSpec(**spec)).id

    def _revoke_loop(self) -> None:
        while (sent := self._revokes.get()) is not None:
            if (delay := sent.at + REVOKE_AFTER_S - time.monotonic()) > 0:
                time.sleep(delay)
            try:
                # terminate: a command already running is killed, a pending one never runs
                self.revoker.revoke(sent.id, terminate=True, reason="soak revoke")
            except Exception as exc:
                self.revoke_errors[type(exc).__name__] += 1
