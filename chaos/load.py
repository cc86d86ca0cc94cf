"""The command stream: commands submitted through the Python API at a steady rate, each of
which appends one line to a marker file of its own every time it is executed."""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from chaos.stack import TENANT
from producer.client import Producer
from producer.spec import CommandSpec

# Most commands are instant; some sleep so that a kill often finds commands mid-run.
SLEEPS_S = (0.0, 0.0, 0.0, 0.02, 0.1, 0.4)
RETRY_SAFE_EVERY = 4  # one command in four may be re-run after a lost worker
CANARY_EVERY = 5  # one in five is given the canary secret (the others run as the gateway's)
RESUBMIT_PAUSE_S = 0.2


@dataclass(frozen=True)
class Accepted:
    """A command the producer accepted: its marker label (also its idempotency key)."""

    label: str
    id: str
    retry_safe: bool
    accepted_at: float  # time.time()
    secret: bool = False  # given the canary: it fails with secrets_unavailable if its
    # message is lost, as the values are never stored (docs/security.md)


def marker_argv(markers: Path, label: str, sleep_s: float, canary: bool = False) -> list[str]:
    """The marker line is written first: a run killed mid-way still counts as an execution.

    With `canary`, the command is given the secret CANARY: the marker line holds its length
    (what the child saw, without the value) and the value goes to stdout, where execq must
    redact it before storing or streaming the output."""
    script = f"echo $$ >> {markers}/{label} || exit 3"
    if canary:
        script = f'echo $$ ${{#CANARY}} >> {markers}/{label} || exit 3; echo "$CANARY"'
    if sleep_s:
        script += f"; sleep {sleep_s}"
    return ["/bin/sh", "-c", script]


@dataclass
class Stream:
    """Submits `n` commands at `rate_per_s` from a thread of its own.

    A submit that raises (the store down) is retried with the same idempotency key until the
    deadline, as a web backend would: a command is accepted once submit returns.
    """

    producer: Producer
    markers: Path
    n: int
    rate_per_s: float
    deadline: float  # time.monotonic()
    seed: int = 0
    canary: str | None = None  # a secret every command is given (chaos.canary checks it)
    accepted: list[Accepted] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    given_up: list[str] = field(default_factory=list)
    duplicate_ids: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._thread = threading.Thread(target=self._run, name="chaos-stream", daemon=True)
        self._rng = random.Random(self.seed)  # noqa: S311 - reproducible load, not secrets
        self.progress = 0  # commands sent so far (accepted or given up)

    def start(self) -> None:
        self._thread.start()

    def join(self, timeout_s: float | None = None) -> bool:
        """Wait for the last submit; False if still submitting after `timeout_s`."""
        self._thread.join(timeout_s)
        return not self._thread.is_alive()

    def _run(self) -> None:
        t0 = time.monotonic()
        run = f"{self._rng.getrandbits(32):08x}"
        for i in range(self.n):
            if (delay := t0 + i / self.rate_per_s - time.monotonic()) > 0:
                time.sleep(delay)
            label = f"c{i:05d}-{run}"
            retry_safe = i % RETRY_SAFE_EVERY == 0
            secret = self.canary is not None and i % CANARY_EVERY == 1
            spec = CommandSpec(
                tenant=TENANT,
                argv=marker_argv(self.markers, label, self._rng.choice(SLEEPS_S), secret),
                secrets={"CANARY": self.canary} if self.canary and secret else {},
                idempotency_key=label,
                retry_safe=retry_safe,
                timeout_s=20,
            )
            self._submit(spec, label, retry_safe, secret)
            self.progress = i + 1

    def _submit(self, spec: CommandSpec, label: str, retry_safe: bool, secret: bool) -> None:
        while True:
            try:
                result = self.producer.submit(spec)
            except Exception as exc:
                # any failure of submit is the fault under test showing; the caller retries
                self.errors[type(exc).__name__] += 1
                if time.monotonic() > self.deadline:
                    self.given_up.append(label)
                    return
                time.sleep(RESUBMIT_PAUSE_S)
                continue
            if result.duplicate:
                # a retried submit whose first attempt did commit: same key, same command
                self.duplicate_ids.append(result.id)
            self.accepted.append(Accepted(label, result.id, retry_safe, time.time(), secret))
            return
