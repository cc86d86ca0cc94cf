"""The `EXECQ_*` settings: read once from the environment, validated, then passed around."""

from __future__ import annotations

import os
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Environment(StrEnum):
    """Where this deployment runs; policy may differ per environment."""

    DEV = "dev"
    STAGING = "staging"
    PROD = "prod"


EMBEDDED_BROKER = "embedded"
LogFormat = Literal["auto", "json", "console"]


PROJECT_MARKER = Path("config/tenants.yaml")
# The settings whose defaults are relative paths: they point into the project directory.
IN_PROJECT = ("tenants_file", "database_url", "audit_log", "workdir_root", "audit_witness")


def _tenants_file_set() -> bool:
    return any(name.upper() == "EXECQ_TENANTS_FILE" for name in os.environ)


def find_project_dir(start: Path) -> Path | None:
    """The first of `start` and its parents holding `config/tenants.yaml`, as git finds .git."""
    for directory in (start, *start.parents):
        if (directory / PROJECT_MARKER).is_file():
            return directory
    return None


def project_dir() -> Path | None:
    """Where relative defaults point when not here: the project directory above this one.

    None means the current directory: EXECQ_TENANTS_FILE is set (everything is then taken
    relative to where execq runs, as set), the project is here, or there is none.
    """
    if _tenants_file_set():
        return None
    here = Path.cwd()
    found = find_project_dir(here)
    return None if found is None or found == here else found


def project_path(relative: Path) -> Path:
    """A default path of execq's, in the project directory."""
    root = project_dir()
    return relative if root is None else root / relative


def _rebase(default: object, root: Path) -> object:
    if isinstance(default, Path):
        return root / default
    if isinstance(default, str) and default.startswith("sqlite:///"):
        return "sqlite:///" + str(root / default.removeprefix("sqlite:///"))
    return default


def in_project(cls: type[BaseSettings], data: Any) -> Any:
    """`data` with each relative default left out of it resolved in the project directory.

    Raises ValueError naming where it looked when one is needed and there is no project:
    defaults relative to any other directory would make (or read) a stray store there.
    """
    if not isinstance(data, dict):
        return data
    missing = [n for n in IN_PROJECT if n in cls.model_fields and n not in data]
    if not missing or "tenants_file" in data or _tenants_file_set():
        return data
    here = Path.cwd()
    root = find_project_dir(here)
    if root is None:
        raise ValueError(
            f"no {PROJECT_MARKER} in {here} or any parent; "
            "set EXECQ_TENANTS_FILE or run from the project directory"
        )
    if root == here:
        return data
    return {**data, **{n: _rebase(cls.model_fields[n].default, root) for n in missing}}


class EnvSettings(BaseSettings):
    """`EXECQ_ENV` alone: what a tenants file named explicitly is read for, from anywhere."""

    model_config = SettingsConfigDict(env_prefix="EXECQ_", extra="ignore", frozen=True)

    env: Environment = Field(
        default=Environment.DEV,
        description="Which `environments:` entry of the tenants file applies.",
    )


class PolicySettings(EnvSettings):
    """The settings that choose the tenant policy, readable without the rest.

    `load_tenants` and `execq config check` need only these two; reading them alone keeps an
    unrelated bad setting (say, the broker URL) from hiding the policy in force.
    Unset, the tenants file and every other relative default point into the project
    directory: the first of the current directory and its parents holding the tenants file.
    """

    model_config = SettingsConfigDict(env_prefix="EXECQ_", extra="ignore", frozen=True)

    tenants_file: Path = Field(
        default=Path("config/tenants.yaml"), description="Tenant pools, limits and policy."
    )

    @model_validator(mode="before")
    @classmethod
    def _in_project(cls, data: Any) -> Any:
        return in_project(cls, data)


class Settings(PolicySettings):
    """Process-wide settings; every field maps to `EXECQ_<NAME>`."""

    model_config = SettingsConfigDict(env_prefix="EXECQ_", extra="ignore", frozen=True)

    broker_url: str = Field(
        default="redis://127.0.0.1:6379/0",
        description="Celery broker; `embedded` forces an embedded Redis server.",
    )
    database_url: str = Field(
        default="sqlite:///.execq/execq.db",
        description="Results store, as an SQLAlchemy URL.",
    )
    audit_log: Path | None = Field(
        default=Path(".execq/audit.jsonl"),
        description="JSON-lines audit sink; `off` keeps the audit trail in the store only.",
    )
    audit_log_max_mb: float = Field(default=64, gt=0, le=65_536)
    audit_log_keep: int = Field(default=10, ge=0, le=10_000)
    lease_s: float = Field(default=30.0, gt=0, le=3600)
    workdir_root: Path = Field(
        default=Path(".execq/work"), description="Where private command directories are made."
    )
    publish_timeout_s: float = Field(default=2.0, gt=0, le=60)
    flower_events: bool = Field(
        default=False,
        description="Workers send Celery's task events (received, started, succeeded...) "
        "from the start. Off by default: a running Flower turns them on itself within 5 s, "
        "and where none watches they would cost about 12 % of a busy worker's throughput.",
    )
    flower_sent_events: bool = Field(
        default=False,
        description="Producers also send Celery's task-sent event, so Flower lists a command "
        "while it is queued, not only once a worker has it: one more Redis PUBLISH per submit.",
    )
    retry_backoff_s: float = Field(
        default=1.0, gt=0, le=3600, description="First automatic retry's delay; doubles each time."
    )
    retry_backoff_max_s: float = Field(
        default=300.0, gt=0, le=3600, description="Longest delay between automatic retries."
    )
    log_format: LogFormat = Field(
        default="auto", description="`json` lines, `console` lines, or `auto` (json unless a tty)."
    )
    trace_url: str | None = Field(
        default=None,
        description="Link to a trace in a trace UI, `{trace_id}` replaced by the command's "
        "trace id (e.g. https://jaeger.example/trace/{trace_id}); unset: the console shows "
        "the id without a link.",
    )
    namespace: str = Field(
        default="execq",
        pattern=r"^[a-z0-9][a-z0-9_-]{0,31}$",
        description="Prefix of every queue, Redis key and channel: deployments with different "
        "namespaces share one Redis database without seeing each other's messages.",
    )

    def key(self, *parts: str) -> str:
        """A Redis key or channel name of this deployment: `<namespace>.<part>.<part>…`."""
        return ".".join((self.namespace, *parts))

    @field_validator("broker_url")
    @classmethod
    def _broker_scheme(cls, value: str) -> str:
        allowed = ("redis://", "rediss://", "redis+socket://", "sentinel://")
        if value != EMBEDDED_BROKER and not value.startswith(allowed):
            raise ValueError(
                f"must be `{EMBEDDED_BROKER}` or a Redis URL ({', '.join(allowed)}), got {value!r}"
            )
        if value.startswith("sentinel://") and "master_name=" not in value:
            # Without it kombu fails only once a worker connects: refuse at start instead.
            raise ValueError(
                "a sentinel:// URL needs ?master_name=NAME, the name the sentinels monitor "
                "(`sentinel monitor NAME …` in sentinel.conf)"
            )
        return value

    @field_validator("audit_log", mode="before")
    @classmethod
    def _audit_off(cls, value: object) -> object:
        if isinstance(value, str) and value.strip().lower() in ("", "off", "none"):
            return None
        return value

    @field_validator("database_url")
    @classmethod
    def _database_scheme(cls, value: str) -> str:
        if not value.startswith(("sqlite://", "postgresql")):
            raise ValueError(f"must be an sqlite:// or postgresql+psycopg:// URL, got {value!r}")
        return value


def describe_validation_error(exc: ValidationError, *, prefix: str = "EXECQ_") -> str:
    """One line per bad field, naming the environment variable the user has to fix."""
    lines = []
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"]) or "?"
        if not err["loc"]:
            # A problem of no one setting (no project directory found): its own words.
            lines.append(err["msg"].removeprefix("Value error, "))
        elif prefix:
            msg = err["msg"].removeprefix("Value error, ")
            lines.append(f"invalid setting {prefix}{field.upper()}: {msg}")
        else:
            lines.append(f"  {field}: {err['msg'].removeprefix('Value error, ')}")
    return "\n".join(lines)


class ConfigInvalid(ValueError):
    """Raised when a setting or the tenants file is invalid; the message names what to fix.

    The settings modules import nothing else from execq, so this is a ValueError;
    `producer.errors.ConfigError` derives from it and from the execq root, and is what the
    producer raises.
    """


def load_settings() -> Settings:
    """Read the settings from the environment; raises ConfigInvalid naming the bad variable."""
    try:
        return Settings()
    except ValidationError as exc:
        raise ConfigInvalid(describe_validation_error(exc)) from None


def load_env_settings() -> EnvSettings:
    """`EXECQ_ENV` only, read by the same rules as `Settings`; needs no project directory."""
    try:
        return EnvSettings()
    except ValidationError as exc:
        raise ConfigInvalid(describe_validation_error(exc)) from None


def load_policy_settings() -> PolicySettings:
    """`EXECQ_TENANTS_FILE` and `EXECQ_ENV` only, read by the same rules as `Settings`."""
    try:
        return PolicySettings()
    except ValidationError as exc:
        raise ConfigInvalid(describe_validation_error(exc)) from None


class GatewaySettings(BaseSettings):
    """`execq gateway`'s settings (`EXECQ_GATEWAY_<NAME>`); its options override them.

    Read apart from Settings: only the gateway needs them, and each of its worker
    processes reads them again (they start from the environment, not from the CLI).
    """

    model_config = SettingsConfigDict(env_prefix="EXECQ_GATEWAY_", extra="ignore", frozen=True)

    host: str = Field(default="127.0.0.1", description="Address to listen on.")
    port: int = Field(default=8080, ge=1, le=65535)
    workers: int = Field(
        default=1, ge=1, le=64, description="Processes serving requests (one core each)."
    )
    max_body_kb: int = Field(default=1024, ge=1, le=65536, description="Largest request body.")
    token_cache_s: float = Field(
        default=2.0,
        ge=0,
        le=300,
        description="How long a verified token is trusted without asking the store again.",
    )
    access_log: bool = Field(default=True, description="Log each request (never a body).")
    session_key: SecretStr | None = Field(
        default=None,
        description="Key that signs the console's session cookies (16 characters or more); "
        "unset: a random key per process, so sessions end when it restarts. Set it when "
        "several processes or gateways serve one address.",
    )
    session_ttl_s: float = Field(
        default=8 * 3600,
        gt=0,
        le=30 * 86400,
        description="How long a console sign-in lasts (never past its token's expiry).",
    )

    @field_validator("session_key")
    @classmethod
    def _long_enough(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < 16:
            raise ValueError("must be 16 characters or more")
        return value


def load_gateway_settings() -> GatewaySettings:
    """The gateway's settings; raises ConfigInvalid naming the bad variable."""
    try:
        return GatewaySettings()
    except ValidationError as exc:
        raise ConfigInvalid(describe_validation_error(exc, prefix="EXECQ_GATEWAY_")) from None
