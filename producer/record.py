"""CommandRecord: what `Producer.get` returns, a read-only view of one command."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from producer.states import State


@dataclass(frozen=True)
class TransitionRecord:
    """One row of a command's state history."""

    from_state: State | None
    to_state: State
    version: int
    at: datetime
    actor: str
    reason: str | None


@dataclass(frozen=True)
class CommandRecord:
    """A command as the store knows it; never contains secret values."""

    id: str
    tenant: str
    state: State
    version: int
    attempts: int
    argv: list[str]
    idempotency_key: str | None
    exit_code: int | None
    signal: int | None
    stdout: str | None
    stderr: str | None
    stdout_bytes: int | None
    stderr_bytes: int | None
    output_truncated: bool
    redacted: bool
    failure_reason: str | None
    error: str | None
    enforced: dict[str, Any] | None
    trace_id: str | None
    principal: str | None
    worker: str | None
    retry_safe: bool
    rollback_on_failure: bool
    compensate: list[str] | None
    secret_names: list[str]
    env: dict[str, str]
    timeout_s: float | None
    cpu_s: int | None
    memory_mb: int | None
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    published_at: datetime | None
    lease_expires_at: datetime | None
    cancel_requested: bool
    compensate_limits: dict[str, Any] | None = None
    snapshot_paths: list[str] | None = None
    max_retries: int = 0
    retry_at: datetime | None = None
    compensation: dict[str, Any] | None = None
    revert_count: int = 0
    needs_attention: bool = False
    batch_id: str | None = None
    batch_step: int | None = None
    held: bool = False
    action: str | None = None
    params: dict[str, Any] | None = None
    transitions: list[TransitionRecord] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (datetimes as ISO 8601, states as strings)."""
        out = asdict(self)
        for key, value in out.items():
            if isinstance(value, datetime):
                out[key] = value.isoformat()
        out["transitions"] = [{**t, "at": t["at"].isoformat()} for t in out["transitions"]]
        return out
