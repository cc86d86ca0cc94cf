"""The gateway's request and response bodies, as OpenAPI publishes them."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from producer.record import CommandRecord
from producer.states import State

# A command's fields as a caller sends them (CommandSpec's, less tenant, idempotency key and
# principal: the token and the Idempotency-Key header give those).
_FIELD_HELP = {
    "argv": "The command as an argv list (argv[0] absolute), never a shell string.",
    "action": "Name of one of the tenant's actions (GET /v1/actions), instead of argv.",
    "params": "The action's parameters, by its JSON Schema.",
}


class CommandRequest(BaseModel):
    """POST /v1/commands: `argv`, or `action` with `params`; the rest is optional."""

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={
            "examples": [
                {"argv": ["/bin/echo", "hello"], "timeout_s": 10},
                {"action": "greet", "params": {"name": "bob", "count": 2}},
            ]
        },
    )

    argv: list[str] | None = Field(default=None, description=_FIELD_HELP["argv"])
    action: str | None = Field(default=None, description=_FIELD_HELP["action"])
    params: dict[str, str | int | bool] | None = Field(
        default=None, description=_FIELD_HELP["params"]
    )
    timeout_s: float | None = Field(default=None, description="Wall clock limit, seconds.")
    cpu_s: int | None = Field(default=None, description="CPU seconds limit.")
    memory_mb: int | None = Field(default=None, description="Memory limit, MiB.")
    env: dict[str, str] | None = Field(default=None, description="Extra child variables.")
    secrets: dict[str, str] | None = Field(
        default=None, description="Child variables never stored or logged (sealed in transit)."
    )
    compensate: list[str] | None = Field(default=None, description="The undo command's argv.")
    rollback_on_failure: bool | None = Field(
        default=None, description="Run `compensate` when the command fails."
    )
    retry_safe: bool | None = Field(
        default=None, description="May be re-run after its worker was lost."
    )
    max_retries: int | None = Field(default=None, description="Automatic re-runs on failure.")
    snapshot_paths: list[str] | None = Field(
        default=None, description="Files archived before the run, restored by a rollback."
    )

    def spec_fields(self) -> dict[str, Any]:
        """The fields the caller gave, for CommandSpec (which validates them)."""
        return self.model_dump(exclude_none=True)


class Submitted(BaseModel):
    """A command accepted (201) or a repeat of its idempotency key (200)."""

    id: str
    state: State
    duplicate: bool


class CommandPage(BaseModel):
    """A page of commands, newest first; pass `next_cursor` as `cursor` for the next."""

    items: list[CommandRecord]
    next_cursor: str | None


class ActionList(BaseModel):
    """The token's tenant's actions, each with its parameters as JSON Schema."""

    tenant: str
    actions: list[dict[str, Any]]


class RevokeRequest(BaseModel):
    """POST /v1/commands/{id}/revoke: `terminate` kills a running command's process tree."""

    model_config = ConfigDict(extra="forbid", strict=True)

    terminate: bool = False


class Health(BaseModel):
    status: str
