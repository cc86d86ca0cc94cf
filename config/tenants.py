"""The tenants file: each tenant's pool size, allow-list, limit ceilings and argument policy."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator

from config.settings import ConfigInvalid, describe_validation_error

TENANT_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,39}$")
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")


class LimitCeilings(BaseModel):
    """The most a command of this tenant may ask for; a spec may ask for less, never more."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    timeout_s: Annotated[float, Field(gt=0, le=86_400)] = 30
    cpu_s: Annotated[int, Field(gt=0, le=86_400)] = 10
    memory_mb: Annotated[int, Field(ge=8, le=1_048_576)] = 256
    processes: Annotated[int, Field(ge=1, le=100_000)] = 64
    output_kb: Annotated[int, Field(ge=1, le=65_536)] = 256
    file_mb: Annotated[int, Field(ge=1, le=1_048_576)] = 64
    open_files: Annotated[int, Field(ge=8, le=65_536)] = 256


class Tenant(BaseModel):
    """One tenant: its own Celery queue, worker pool, allow-list and ceilings."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = ""
    concurrency: Annotated[int, Field(ge=1, le=256)] = 1
    executables: tuple[str, ...]
    limits: LimitCeilings = LimitCeilings()
    deny_args: tuple[str, ...] = ()
    env: dict[str, str] = Field(default_factory=dict, description="Set in every command's env.")
    allowed_env: tuple[str, ...] | None = Field(
        default=None, description="Names a spec's env may set; None allows any safe name."
    )
    max_attempts: Annotated[int, Field(ge=1, le=100)] = 3
    max_retries: Annotated[int, Field(ge=0, le=20)] = Field(
        default=5, description="Ceiling of a spec's max_retries (automatic re-runs)."
    )
    snapshot_roots: tuple[str, ...] = Field(
        default=(), description="Directories under which a spec's snapshot_paths may lie."
    )
    snapshot_max_mb: Annotated[int, Field(ge=1, le=1024)] = Field(
        default=16, description="Most file content one command's snapshot may hold."
    )
    trace_argv: bool = Field(
        default=False,
        description="Put the whole argv (redacted) in span attributes, not just argv[0].",
    )
    # YAML reads an unquoted `off` as false, which here can only mean "off".
    masking: Annotated[
        Literal["L1", "L2", "L3", "off"],
        BeforeValidator(lambda v: "off" if v is False else v),
    ] = Field(
        default="L1",
        description="Pattern masking of stored output; exact secrets are always scrubbed.",
    )

    @field_validator("executables")
    @classmethod
    def _absolute(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("at least one executable is required")
        for path in value:
            if not path.startswith("/"):
                raise ValueError(f"{path!r} is not an absolute path")
        return value

    @field_validator("snapshot_roots")
    @classmethod
    def _roots(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for path in value:
            if not path.startswith("/") or path.rstrip("/") == "":
                raise ValueError(f"{path!r} is not an absolute directory other than /")
        return value

    @field_validator("deny_args")
    @classmethod
    def _regexes(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for pattern in value:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"{pattern!r} is not a valid regex: {exc}") from None
        return value

    @field_validator("env")
    @classmethod
    def _env_names(cls, value: dict[str, str]) -> dict[str, str]:
        for name in value:
            if not ENV_NAME.match(name):
                raise ValueError(f"{name!r} is not a valid environment variable name")
        return value

    @property
    def queue(self) -> str:
        """The Celery queue this tenant's pool consumes."""
        return f"execq.{self.name}"

    def denied_by(self, argv: tuple[str, ...] | list[str]) -> str | None:
        """The first deny_args pattern that matches an argument, or None."""
        for pattern in self.deny_args:
            compiled = re.compile(pattern)
            for arg in argv[1:]:
                if compiled.search(arg):
                    return pattern
        return None


class TenantsFile(BaseModel):
    """The whole tenants file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tenants: dict[str, Tenant]

    @field_validator("tenants")
    @classmethod
    def _names(cls, value: dict[str, Tenant]) -> dict[str, Tenant]:
        if not value:
            raise ValueError("at least one tenant is required")
        named = {}
        for name, tenant in value.items():
            if not TENANT_NAME.match(name):
                raise ValueError(
                    f"tenant name {name!r} must match {TENANT_NAME.pattern} "
                    "(it becomes a queue name)"
                )
            named[name] = tenant.model_copy(update={"name": name})
        return named

    def get(self, name: str) -> Tenant | None:
        """The tenant called `name`, or None."""
        return self.tenants.get(name)

    @property
    def largest_timeout_s(self) -> float:
        """The longest wall-clock ceiling of any tenant (sizes the visibility timeout)."""
        return max(t.limits.timeout_s for t in self.tenants.values())


def load_tenants(path: Path) -> TenantsFile:
    """Read and validate a tenants file; raises ConfigInvalid naming the file and field."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigInvalid(f"invalid setting EXECQ_TENANTS_FILE: {path} does not exist") from None
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigInvalid(
            f"invalid setting EXECQ_TENANTS_FILE: cannot read {path}: {exc}"
        ) from None
    if not isinstance(raw, dict):
        raise ConfigInvalid(f"invalid tenants file {path}: expected a mapping with `tenants:`")
    try:
        return TenantsFile.model_validate(raw)
    except ValidationError as exc:
        detail = describe_validation_error(exc, prefix="")
        raise ConfigInvalid(f"invalid tenants file {path}:\n{detail}") from None
