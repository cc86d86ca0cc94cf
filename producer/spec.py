"""CommandSpec: what a web backend asks execq to run, validated and frozen."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from producer.dangerous import dangerous_env
from producer.errors import SpecError

# Byte budgets keep one spec well inside a Redis message, a store row and the kernel's ARG_MAX.
MAX_ARGS = 1024
MAX_ARG_BYTES = 32 * 1024
MAX_ARGV_BYTES = 128 * 1024
MAX_ENV_VARS = 64
MAX_ENV_VALUE_BYTES = 8 * 1024
MAX_ENV_BYTES = 64 * 1024
MAX_KEY_LENGTH = 200
# Limits are stored in 32-bit INTEGER columns (every tenant ceiling is far below this).
MAX_LIMIT_INT = 2**31 - 1

ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
KEY_PATTERN = re.compile(r"^[\x21-\x7e]{1,200}$")
TENANT_PATTERN = re.compile(r"^[a-z][a-z0-9_-]{0,39}$")
ACTION_PATTERN = re.compile(r"^[a-z][a-z0-9_.-]{0,63}$")
PARAM_PATTERN = re.compile(r"^[a-z_][a-z0-9_]{0,63}$")
MAX_PARAMS = 64

# Set by execq itself: a spec may not override them.
RESERVED_ENV = frozenset({"PATH", "HOME", "TMPDIR", "TRACEPARENT", "TRACESTATE", "PWD"})


def _check_env(kind: str, env: Mapping[str, str]) -> None:
    if len(env) > MAX_ENV_VARS:
        raise ValueError(f"{kind} has {len(env)} variables, more than {MAX_ENV_VARS}")
    total = 0
    for name, value in env.items():
        if not ENV_NAME.fullmatch(name):  # match() would let "NAME\n" through ($)
            raise ValueError(f"{kind} name {name!r} is not a valid variable name")
        if name in RESERVED_ENV:
            raise ValueError(f"{kind} may not set {name}: execq sets it")
        why = dangerous_env(name)
        if why is not None:
            raise ValueError(f"{kind} may not set {name}: it changes which code runs ({why})")
        if "\x00" in value:
            raise ValueError(f"{kind} {name} contains a NUL byte")
        size = _utf8_size(value, f"{kind} {name}")
        if size > MAX_ENV_VALUE_BYTES:
            raise ValueError(f"{kind} {name} is {size} bytes, more than {MAX_ENV_VALUE_BYTES}")
        total += size + len(name) + 1
    if total > MAX_ENV_BYTES:
        raise ValueError(f"{kind} is {total} bytes in all, more than {MAX_ENV_BYTES}")


def _utf8_size(text: str, what: str) -> int:
    try:
        return len(text.encode())
    except UnicodeEncodeError:  # lone surrogates: not text any child or store could hold
        raise ValueError(f"{what} is not valid UTF-8 text") from None


def check_argv(kind: str, argv: tuple[str, ...]) -> None:
    """ValueError unless argv is non-empty, within the size budgets, with an absolute argv[0]."""
    if not argv:
        raise ValueError(f"{kind} must not be empty")
    if len(argv) > MAX_ARGS:
        raise ValueError(f"{kind} has {len(argv)} arguments, more than {MAX_ARGS}")
    total = 0
    for i, arg in enumerate(argv):
        if "\x00" in arg:
            raise ValueError(f"{kind}[{i}] contains a NUL byte")
        size = _utf8_size(arg, f"{kind}[{i}]")
        if size > MAX_ARG_BYTES:
            raise ValueError(f"{kind}[{i}] is {size} bytes, more than {MAX_ARG_BYTES}")
        total += size + 1
    if total > MAX_ARGV_BYTES:
        raise ValueError(f"{kind} is {total} bytes in all, more than {MAX_ARGV_BYTES}")
    if not argv[0].startswith("/"):
        raise ValueError(f"{kind}[0] must be an absolute path, got {argv[0]!r}")


def _to_float(value: int) -> float | int:
    # An int too large for a float is left as it is, for the field to refuse it (not crash).
    try:
        return float(value)
    except OverflowError:
        return value


MAX_SNAPSHOT_PATHS = 32
MAX_RETRIES = 20


class CompensateLimits(BaseModel):
    """The compensation's own limits (each capped by the tenant's ceilings like the command's)."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    timeout_s: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    cpu_s: int | None = Field(default=None, gt=0, le=MAX_LIMIT_INT)
    memory_mb: int | None = Field(default=None, gt=0, le=MAX_LIMIT_INT)

    @model_validator(mode="before")
    @classmethod
    def _int_timeout(cls, data: Any) -> Any:
        if isinstance(data, dict) and type(data.get("timeout_s")) is int:
            data = {**data, "timeout_s": _to_float(data["timeout_s"])}
        return data


class CommandSpec(BaseModel):
    """One command to run: argv (never a shell string), limits, env and how to undo it."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    tenant: str
    # Either a raw argv or an action of the tenant's with its parameters: execq fills the
    # action's template into argv (see producer.actions); a caller never gives both.
    argv: tuple[str, ...] = ()
    action: str | None = None
    params: dict[str, str | int | bool] = Field(default_factory=dict, repr=False)
    idempotency_key: str | None = None
    timeout_s: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    cpu_s: int | None = Field(default=None, gt=0, le=MAX_LIMIT_INT)
    memory_mb: int | None = Field(default=None, gt=0, le=MAX_LIMIT_INT)
    env: dict[str, str] = Field(default_factory=dict)
    secrets: dict[str, str] = Field(default_factory=dict, repr=False)
    compensate: tuple[str, ...] | None = None
    compensate_limits: CompensateLimits | None = None
    # Files or small directories archived before the command runs and restored by its
    # rollback (before `compensate` runs, if there is one as well).
    snapshot_paths: tuple[str, ...] = ()
    rollback_on_failure: bool = False
    retry_safe: bool = False
    # Automatic re-runs of a failed retry-safe command, with exponential backoff and jitter.
    max_retries: int = Field(default=0, ge=0, le=MAX_RETRIES)
    principal: str | None = Field(default=None, max_length=200)

    def __init__(self, **data: Any) -> None:
        # Callers catch SpecError (an ExecqError and a ValueError), not pydantic's type.
        # It is raised outside the `except`, so no traceback or __context__ carries the
        # ValidationError, whose text quotes the input (secret values included).
        problem = None
        try:
            super().__init__(**data)
        except ValidationError as exc:
            problem = describe(exc)
        if problem is not None:
            raise SpecError(problem)

    @model_validator(mode="before")
    @classmethod
    def _lists_to_tuples(cls, data: Any) -> Any:
        # Callers naturally pass lists; strict mode would refuse them for tuple fields.
        if isinstance(data, dict):
            data = dict(data)
            for key in ("argv", "compensate", "snapshot_paths"):
                if isinstance(data.get(key), list):
                    data[key] = tuple(data[key])
            for key in ("timeout_s",):
                if isinstance(data.get(key), int) and not isinstance(data.get(key), bool):
                    data[key] = _to_float(data[key])
        return data

    @field_validator("tenant")
    @classmethod
    def _tenant(cls, value: str) -> str:
        if not TENANT_PATTERN.fullmatch(value):
            raise ValueError(f"{value!r} is not a tenant name")
        return value

    @field_validator("argv")
    @classmethod
    def _argv(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if value:  # empty only with an action: checked in _no_overlap
            check_argv("argv", value)
        return value

    @field_validator("action")
    @classmethod
    def _action(cls, value: str | None) -> str | None:
        if value is not None and not ACTION_PATTERN.fullmatch(value):
            raise ValueError(f"{value[:80]!r} is not an action name ({ACTION_PATTERN.pattern})")
        return value

    @field_validator("params")
    @classmethod
    def _params(cls, value: dict[str, str | int | bool]) -> dict[str, str | int | bool]:
        if len(value) > MAX_PARAMS:
            raise ValueError(f"{len(value)} parameters, more than {MAX_PARAMS}")
        for name, item in value.items():
            if not PARAM_PATTERN.fullmatch(name):
                raise ValueError(f"{name[:80]!r} is not a parameter name ({PARAM_PATTERN.pattern})")
            if isinstance(item, str):
                if "\x00" in item:
                    raise ValueError(f"parameter {name} contains a NUL byte")
                size = _utf8_size(item, f"parameter {name}")
                if size > MAX_ARG_BYTES:
                    raise ValueError(f"parameter {name} is {size} bytes, more than {MAX_ARG_BYTES}")
            elif not isinstance(item, bool) and not -(2**63) <= item < 2**63:
                raise ValueError(f"parameter {name} is outside the 64-bit integer range")
        return value

    @field_validator("compensate")
    @classmethod
    def _compensate(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if value is not None:
            check_argv("compensate", value)
        return value

    @field_validator("snapshot_paths")
    @classmethod
    def _snapshot_paths(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if len(value) > MAX_SNAPSHOT_PATHS:
            raise ValueError(f"{len(value)} paths, more than {MAX_SNAPSHOT_PATHS}")
        for path in value:
            _utf8_size(path, "snapshot path")
            if "\x00" in path or not path.startswith("/") or len(path) > 4096:
                raise ValueError(f"{path!r} is not an absolute path")
            if any(part in (".", "..") for part in path.split("/")):
                raise ValueError(f"{path!r} must not contain . or .. components")
        return value

    @field_validator("principal")
    @classmethod
    def _principal(cls, value: str | None) -> str | None:
        if value is not None:
            _utf8_size(value, "principal")
            if "\x00" in value:  # no store column (PostgreSQL text) can hold it
                raise ValueError("principal contains a NUL byte")
        return value

    @field_validator("idempotency_key")
    @classmethod
    def _key(cls, value: str | None) -> str | None:
        if value is not None and not KEY_PATTERN.fullmatch(value):
            raise ValueError(
                f"must be 1-{MAX_KEY_LENGTH} printable ASCII characters without spaces"
            )
        return value

    @field_validator("env")
    @classmethod
    def _env(cls, value: dict[str, str]) -> dict[str, str]:
        _check_env("env", value)
        return value

    @field_validator("secrets")
    @classmethod
    def _secrets(cls, value: dict[str, str]) -> dict[str, str]:
        _check_env("secrets", value)
        return value

    @model_validator(mode="after")
    def _no_overlap(self) -> CommandSpec:
        if self.action is None:
            if not self.argv:
                raise ValueError(
                    "argv must not be empty (give an argv, or an action with its params)"
                )
            if self.params:
                raise ValueError("params go with an action; this spec names none")
        elif self.argv:
            raise ValueError("give an argv or an action, not both (the action makes the argv)")
        elif self.compensate is not None or self.snapshot_paths:
            raise ValueError(
                "an action's compensate and snapshot_paths come from the tenants file, "
                "not from the caller"
            )
        both = set(self.env) & set(self.secrets)
        if both:
            raise ValueError(f"{sorted(both)} given both as env and as secrets")
        if (
            self.rollback_on_failure
            and self.action is None
            and self.compensate is None
            and not self.snapshot_paths
        ):
            raise ValueError("rollback_on_failure needs a compensate command or snapshot_paths")
        if self.compensate_limits is not None and self.compensate is None:
            raise ValueError("compensate_limits given without a compensate command")
        if self.max_retries and not self.retry_safe:
            raise ValueError("max_retries needs retry_safe=True: only those may run again")
        return self

    def __repr__(self) -> str:
        return (
            f"CommandSpec(tenant={self.tenant!r}, argv={self.argv!r}, action={self.action!r}, "
            f"idempotency_key={self.idempotency_key!r}, secrets={sorted(self.secrets)!r})"
        )

    __str__ = __repr__

    def canonical(self) -> dict[str, Any]:
        """What makes two specs "the same command": everything but secret values."""
        out: dict[str, Any] = {
            "tenant": self.tenant,
            "argv": list(self.argv),
            "timeout_s": self.timeout_s,
            "cpu_s": self.cpu_s,
            "memory_mb": self.memory_mb,
            "env": dict(sorted(self.env.items())),
            "secret_names": sorted(self.secrets),
            "compensate": list(self.compensate) if self.compensate else None,
            "rollback_on_failure": self.rollback_on_failure,
            "retry_safe": self.retry_safe,
        }
        # Newer fields enter the canonical form only when used, so the keys (and hashes) of
        # specs stored before they existed still match.
        if self.compensate_limits is not None:
            out["compensate_limits"] = self.compensate_limits.model_dump()
        if self.snapshot_paths:
            out["snapshot_paths"] = list(self.snapshot_paths)
        if self.max_retries:
            out["max_retries"] = self.max_retries
        if self.action is not None:
            # Params as sent (secret ones are in `secrets` by the time this is asked).
            out["action"] = self.action
            out["params"] = dict(sorted(self.params.items()))
        return out

    def spec_hash(self) -> str:
        """SHA-256 of the canonical spec: an idempotency key reused with another spec differs."""
        blob = json.dumps(self.canonical(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()


def cmd_hash(argv: tuple[str, ...] | list[str]) -> str:
    """SHA-256 of the canonical argv (JSON array), as audit events carry it."""
    return hashlib.sha256(json.dumps(list(argv), separators=(",", ":")).encode()).hexdigest()


def describe(exc: ValidationError) -> str:
    """A one-line-per-problem message that names each bad field (never echoes secret values)."""
    lines = []
    for err in exc.errors(include_input=False, include_url=False):
        loc = ".".join(str(p) for p in err["loc"]) or "spec"
        msg = err["msg"].removeprefix("Value error, ")
        lines.append(f"{loc}: {msg}")
    return "; ".join(lines)
