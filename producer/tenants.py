"""The tenants file: each tenant's pool size, allow-list, limit ceilings and argument policy.

A tenant may differ per deployment environment: its `environments:` mapping holds, for `dev`,
`staging` and `prod`, overrides of its policy. `load_tenants` applies the entry for the
environment in force (`EXECQ_ENV` unless told otherwise), so everything downstream sees one
effective policy per tenant and never the overrides themselves.
"""

from __future__ import annotations

import pwd
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    PrivateAttr,
    Tag,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.json_schema import SkipJsonSchema

from producer.action_model import Action, Regex, Roots, rename_allowed_env
from producer.settings import (
    ConfigInvalid,
    Environment,
    describe_validation_error,
    load_env_settings,
)

TENANT_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,39}$")
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"


# --- field types shared by a tenant and its per-environment overrides --------------------


def _absolute_executables(value: tuple[str, ...]) -> tuple[str, ...]:
    if not value:
        raise ValueError("at least one executable is required")
    for path in value:
        _absolute(path)
    return value


def _absolute(path: str) -> str:
    if not path.startswith("/"):
        raise ValueError(f"{path!r} is not an absolute path")
    return path


Executables = Annotated[tuple[str, ...], AfterValidator(_absolute_executables)]
AbsolutePath = Annotated[str, AfterValidator(_absolute)]
SnapshotRoots = Roots
MaxRetries = Annotated[int, Field(ge=0, le=20)]
MaxConcurrent = Annotated[int, Field(ge=1, le=100_000)]
TimeoutS = Annotated[float, Field(gt=0, le=86_400)]
CpuS = Annotated[int, Field(gt=0, le=86_400)]
MemoryMb = Annotated[int, Field(ge=8, le=1_048_576)]
Processes = Annotated[int, Field(ge=1, le=100_000)]
OutputKb = Annotated[int, Field(ge=1, le=65_536)]
FileMb = Annotated[int, Field(ge=1, le=1_048_576)]
OpenFiles = Annotated[int, Field(ge=8, le=65_536)]
# Below 1000 are system accounts (root above all); 65534 is `nobody`, shared by unrelated
# daemons, so a tenant running as it could reach their files.
Uid = Annotated[int, Field(ge=1000, lt=65_534)]
Gid = Annotated[int, Field(ge=1, lt=65_534)]


# What a spec's `env` may set when the tenant says nothing: locale and time zone only.
DEFAULT_ENV_ALLOW = (
    "LANG",
    "LANGUAGE",
    "LC_ALL",
    "LC_COLLATE",
    "LC_CTYPE",
    "LC_MESSAGES",
    "LC_MONETARY",
    "LC_NUMERIC",
    "LC_TIME",
    "TZ",
)
ACTION_NAME = re.compile(r"^[a-z][a-z0-9_.-]{0,63}$")
DENIED_OPTION = re.compile(r"^(--[A-Za-z0-9][A-Za-z0-9_-]*|-[A-Za-z0-9?@#][A-Za-z0-9_-]*)$")


def _env_names(value: tuple[str, ...]) -> tuple[str, ...]:
    for name in value:
        if not ENV_NAME.fullmatch(name):
            raise ValueError(f"{name!r} is not a valid environment variable name")
    return value


def _deny_options(value: dict[str, tuple[str, ...]]) -> dict[str, tuple[str, ...]]:
    for executable, options in value.items():
        _absolute(executable)
        if not options:
            raise ValueError(f"{executable}: list at least one option")
        for option in options:
            if not DENIED_OPTION.fullmatch(option):
                raise ValueError(
                    f"{executable}: {option!r} is not an option spelling "
                    "(write --long, -x, or a single-dash word such as -exec)"
                )
    return value


EnvNames = Annotated[tuple[str, ...], AfterValidator(_env_names)]
DenyOptions = Annotated[dict[str, tuple[str, ...]], AfterValidator(_deny_options)]
ENV_ALLOW_HELP = (
    "The only variable names a spec's env may set (secrets aside); left out: locale and time "
    "zone (LANG, LC_*, TZ). Names in execq's table of dangerous variables are always refused."
)
RAW_ARGV_HELP = (
    "true: callers may send a raw argv (checked by the rules here); false: only the tenant's "
    "actions run and a raw argv is refused (rule raw_argv)."
)
DENY_OPTIONS_HELP = (
    "Per executable (symlinks resolved), options refused in any spelling the program accepts: "
    "--long, its unambiguous prefixes and --long=value, -x alone or bundled (-rf), anywhere "
    "before `--`; single-dash words (find's -exec) anywhere."
)


class LimitCeilings(BaseModel):
    """The most a command of this tenant may ask for; a spec may ask for less, never more."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    timeout_s: TimeoutS = 30
    cpu_s: CpuS = 10
    memory_mb: MemoryMb = 256
    processes: Processes = 64
    output_kb: OutputKb = 256
    file_mb: FileMb = 64
    open_files: OpenFiles = 256
    disk_mb: Annotated[int, Field(ge=1, le=1_048_576)] = Field(
        default=256,
        description="All a command may write in its private directory (HOME, TMPDIR, cwd).",
    )


class LimitOverrides(BaseModel):
    """Ceilings one environment changes; the others keep the tenant's values."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    timeout_s: TimeoutS | None = None
    cpu_s: CpuS | None = None
    memory_mb: MemoryMb | None = None
    processes: Processes | None = None
    output_kb: OutputKb | None = None
    file_mb: FileMb | None = None
    open_files: OpenFiles | None = None
    disk_mb: Annotated[int, Field(ge=1, le=1_048_576)] | None = None

    def applied_to(self, base: LimitCeilings) -> LimitCeilings:
        """`base` with the ceilings given here replaced, field by field."""
        changed = {k: v for k, v in self.model_dump().items() if v is not None}
        return LimitCeilings.model_validate({**base.model_dump(), **changed})


class DenyRule(BaseModel):
    """A deny_args entry scoped to one executable (compared after resolving symlinks).

    With a `pattern`, an argument of that executable matching it is refused (rule
    `deny_args:PATTERN`); without one, the executable is refused outright (rule
    `deny_executable:PATH`), even though it is on the allow-list.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    executable: AbsolutePath = Field(description="Absolute path; symlinks are resolved.")
    pattern: Regex | None = Field(
        default=None,
        description="Regex searched in each argument; none refuses the executable outright.",
    )

    @property
    def rule(self) -> str:
        """The rule name a refusal by this entry carries."""
        if self.pattern is None:
            return f"deny_executable:{self.executable}"
        return f"deny_args:{self.pattern}"


def _deny_kind(value: Any) -> str:
    return "scoped" if isinstance(value, dict | DenyRule) else "regex"


# A plain regex applies to every executable; a mapping to one. The discriminator picks the
# branch by shape so an error names what is wrong with the entry, not both alternatives.
DenyEntry = Annotated[
    Annotated[Regex, Tag("regex")] | Annotated[DenyRule, Tag("scoped")],
    Discriminator(_deny_kind),
]
DenyArgs = tuple[DenyEntry, ...]


class RunAs(BaseModel):
    """The range of unprivileged uids (and the gid) a tenant's commands run as."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    uid_min: Uid
    uid_max: Uid
    gid: Gid

    @model_validator(mode="after")
    def _ordered(self) -> RunAs:
        if self.uid_min > self.uid_max:
            raise ValueError(f"uid_min {self.uid_min} is above uid_max {self.uid_max}")
        return self

    @property
    def uids(self) -> int:
        """How many uids the range holds: the most pool processes it can give one each."""
        return self.uid_max - self.uid_min + 1

    @property
    def uid_range(self) -> str:
        """The range as a message writes it: `20000-20009`."""
        return f"{self.uid_min}-{self.uid_max}"


class FilesystemView(BaseModel):
    """A filesystem of its own for each command, built by bubblewrap.

    The host's root is mounted read-only; the command's private directory is the only
    writable place besides a private /tmp of `tmp_mb` and the `writable` directories;
    /run (where daemons keep their sockets) and the `hidden` paths are empty; the command
    sees only its own processes.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    required: bool = Field(
        default=True,
        description=(
            "true: a worker on a host without a working bubblewrap refuses to start for this "
            "tenant; false: it runs the tenant's commands with the host's view and says so."
        ),
    )
    tmp_mb: Annotated[int, Field(ge=1, le=65_536)] = Field(
        default=64, description="Size of the command's private /tmp (memory-backed)."
    )
    writable: SnapshotRoots = Field(
        default=(), description="Host directories the command may write to (bound read-write)."
    )
    hidden: SnapshotRoots = Field(
        default=(), description="Host directories replaced by an empty one (e.g. /home, /srv)."
    )


class SubmitRate(BaseModel):
    """A token bucket: `per_s` submissions a second on average, bursts of up to `burst`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    per_s: Annotated[float, Field(gt=0, le=100_000)]
    burst: Annotated[int, Field(ge=1, le=100_000)]


NETWORK_HELP = (
    "Whether the tenant's commands may use the network; false runs each in a network "
    "namespace of its own (a root worker with unshare is required, or the worker refuses)."
)
RUN_AS_HELP = (
    "Unprivileged uid range and gid the tenant's commands run as (never root): one uid per "
    "pool process (a root worker with setpriv is required, or the worker refuses)."
)
MAX_CONCURRENT_HELP = (
    "Most commands of the tenant running at once across all its workers and hosts; a delivery "
    "beyond it waits (its message comes back about a second later)."
)
FILESYSTEM_HELP = (
    "A filesystem view of its own per command (bubblewrap): read-only root, private /tmp, "
    "no /run sockets, own process list; null (the default) keeps the host's view."
)
SUBMIT_RATE_HELP = (
    "Submissions allowed per second for the tenant (a token bucket in Redis shared by every "
    "producer); a submit beyond it is refused with rule submit_rate and recorded."
)
HTTP_RATE_HELP = (
    "Requests a second the HTTP gateway accepts from the tenant's tokens (a token bucket in "
    "Redis shared by every gateway); beyond it the answer is 429 with Retry-After and nothing "
    "is recorded. null: no limit."
)
REQUIRE_KEY_HELP = (
    "Every command of the tenant must carry an idempotency key (the HTTP gateway's "
    "Idempotency-Key header); one without is refused with rule idempotency_key and recorded."
)
DEFAULT_HTTP_RATE = SubmitRate(per_s=100, burst=200)


def _no_defaults(schema: dict[str, Any]) -> None:
    # An override's fields have no default: left out, the tenant's own value is kept.
    for prop in schema.get("properties", {}).values():
        prop.pop("default", None)


class TenantOverrides(BaseModel):
    """What one environment changes in a tenant's policy; anything left out is kept.

    Lists replace the tenant's list (write the whole list, e.g. all of deny_args); `limits`
    are merged field by field. An explicit null resets the nullable fields (run_as,
    max_concurrent, submit_rate, filesystem) to none, and env_allow to its default.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, json_schema_extra=_no_defaults)

    # The defaults below are never used as values: only the fields given in the file
    # (`model_fields_set`) are applied, so "left out" and "null" stay distinct.
    executables: Executables = ()
    deny_args: DenyArgs = ()
    limits: LimitOverrides = LimitOverrides()
    max_retries: MaxRetries = 0
    snapshot_roots: SnapshotRoots = ()
    network: bool = Field(default=True, description=NETWORK_HELP)
    run_as: RunAs | None = Field(default=None, description=RUN_AS_HELP)
    max_concurrent: MaxConcurrent | None = Field(default=None, description=MAX_CONCURRENT_HELP)
    submit_rate: SubmitRate | None = Field(default=None, description=SUBMIT_RATE_HELP)
    http_rate: SubmitRate | None = Field(default=None, description=HTTP_RATE_HELP)
    require_idempotency_key: bool = Field(default=False, description=REQUIRE_KEY_HELP)
    filesystem: FilesystemView | None = Field(default=None, description=FILESYSTEM_HELP)
    env_allow: EnvNames | None = Field(default=None, description=ENV_ALLOW_HELP)
    raw_argv: bool = Field(default=True, description=RAW_ARGV_HELP)
    deny_options: DenyOptions = Field(default_factory=dict, description=DENY_OPTIONS_HELP)
    actions: dict[str, Action] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _allowed_env_alias(cls, value: Any) -> Any:
        return rename_allowed_env(value)

    def applied_to(self, tenant: Tenant) -> Tenant:
        """`tenant` with these overrides in place and no environments left to apply."""
        data = {name: getattr(tenant, name) for name in Tenant.model_fields}
        for name in self.model_fields_set:
            value = getattr(self, name)
            if name == "limits":
                value = value.applied_to(tenant.limits)
            elif name == "env_allow" and value is None:
                value = DEFAULT_ENV_ALLOW  # an explicit null: back to the default
            data[name] = value
        data["environments"] = EnvironmentOverrides()
        return Tenant.model_validate(data)


class EnvironmentOverrides(BaseModel):
    """Per-environment overrides of a tenant's policy, keyed by `EXECQ_ENV`'s values."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dev: TenantOverrides | None = None
    staging: TenantOverrides | None = None
    prod: TenantOverrides | None = None

    @model_validator(mode="before")
    @classmethod
    def _known(cls, value: Any) -> Any:
        # A typo such as `production:` would otherwise leave prod on the base policy.
        if isinstance(value, dict):
            known = [e.value for e in Environment]
            for key in value:
                if key not in known:
                    raise ValueError(
                        f"unknown environment {key!r} (EXECQ_ENV is one of {', '.join(known)})"
                    )
        return value

    def get(self, env: Environment) -> TenantOverrides | None:
        """The overrides for `env`, or None."""
        found: TenantOverrides | None = getattr(self, env.value)
        return found

    @property
    def empty(self) -> bool:
        """True when no environment changes anything."""
        return all(self.get(env) is None for env in Environment)


class Tenant(BaseModel):
    """One tenant: its own Celery queue, worker pool, allow-list and ceilings."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Set from the tenant's key in the file, never written in it.
    name: SkipJsonSchema[str] = ""
    concurrency: Annotated[int, Field(ge=1, le=256)] = 1
    executables: Executables = Field(
        description="Allow-list of absolute paths; symlinks are resolved on both sides."
    )
    limits: LimitCeilings = LimitCeilings()
    deny_args: DenyArgs = Field(
        default=(),
        description=(
            "Regexes refusing any command with a matching argument, or {executable, pattern} "
            "for one executable only, or {executable} to refuse that executable outright."
        ),
    )
    env: dict[str, str] = Field(default_factory=dict, description="Set in every command's env.")
    env_allow: EnvNames = Field(default=DEFAULT_ENV_ALLOW, description=ENV_ALLOW_HELP)
    raw_argv: bool = Field(default=True, description=RAW_ARGV_HELP)
    deny_options: DenyOptions = Field(default_factory=dict, description=DENY_OPTIONS_HELP)
    actions: dict[str, Action] = Field(
        default_factory=dict,
        description="Named command templates with typed parameters (see docs/actions.md).",
    )
    max_attempts: Annotated[int, Field(ge=1, le=100)] = 3
    max_retries: MaxRetries = Field(
        default=5, description="Ceiling of a spec's max_retries (automatic re-runs)."
    )
    snapshot_roots: SnapshotRoots = Field(
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
        BeforeValidator(
            lambda v: "off" if v is False else v,
            json_schema_input_type=Literal["L1", "L2", "L3", "off", False],
        ),
    ] = Field(
        default="L1",
        description="Pattern masking of stored output; exact secrets are always scrubbed.",
    )
    network: bool = Field(default=True, description=NETWORK_HELP)
    run_as: RunAs | None = Field(default=None, description=RUN_AS_HELP)
    max_concurrent: MaxConcurrent | None = Field(default=None, description=MAX_CONCURRENT_HELP)
    submit_rate: SubmitRate | None = Field(default=None, description=SUBMIT_RATE_HELP)
    http_rate: SubmitRate | None = Field(default=DEFAULT_HTTP_RATE, description=HTTP_RATE_HELP)
    require_idempotency_key: bool = Field(default=False, description=REQUIRE_KEY_HELP)
    filesystem: FilesystemView | None = Field(default=None, description=FILESYSTEM_HELP)
    environments: EnvironmentOverrides = Field(
        default=EnvironmentOverrides(),
        description="Policy overrides for dev, staging or prod; the one for EXECQ_ENV applies.",
    )

    @model_validator(mode="before")
    @classmethod
    def _allowed_env_alias(cls, value: Any) -> Any:
        value = rename_allowed_env(value)
        if isinstance(value, dict) and "env_allow" in value and value["env_allow"] is None:
            value = {**value, "env_allow": DEFAULT_ENV_ALLOW}
        return value

    @field_validator("env")
    @classmethod
    def _env_names(cls, value: dict[str, str]) -> dict[str, str]:
        for name in value:
            if not ENV_NAME.fullmatch(name):
                raise ValueError(f"{name!r} is not a valid environment variable name")
        return value

    @model_validator(mode="after")
    def _actions_fit(self) -> Tenant:
        # Checked against the tenant they belong to: an action may only run what the tenant
        # allows, within its ceilings (and again once an environment's overrides apply).
        for name, action in self.actions.items():
            if not ACTION_NAME.fullmatch(name):
                raise ValueError(f"action name {name!r} must match {ACTION_NAME.pattern}")
            problem = action.misfit(self)
            if problem:
                raise ValueError(f"action {name!r}: {problem}")
        return self

    @property
    def queue(self) -> str:
        """The Celery queue this tenant's pool consumes: its name. In Redis the queue is the
        list `<EXECQ_NAMESPACE>.<name>` (kombu prefixes every key with the namespace)."""
        return self.name

    @property
    def resolved(self) -> bool:
        """True when no per-environment override is left to apply (the policy is final)."""
        return self.environments.empty

    def effective(self, env: Environment | str) -> Tenant:
        """This tenant's policy in `env`: its overrides for `env` applied, the rest dropped."""
        override = self.environments.get(Environment(env))
        if override is None:
            return self.model_copy(update={"environments": EnvironmentOverrides()})
        return override.applied_to(self)


class TenantsFile(BaseModel):
    """The whole tenants file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tenants: dict[str, Tenant]
    # What `for_env` resolved from, so a resolved file can still be resolved for another env.
    _source: TenantsFile | None = PrivateAttr(default=None)
    _environment: Environment | None = PrivateAttr(default=None)

    @field_validator("tenants")
    @classmethod
    def _names(cls, value: dict[str, Tenant]) -> dict[str, Tenant]:
        if not value:
            raise ValueError("at least one tenant is required")
        named = {}
        for name, tenant in value.items():
            if not TENANT_NAME.fullmatch(name):
                raise ValueError(
                    f"tenant name {name!r} must match {TENANT_NAME.pattern} "
                    "(it becomes a queue name)"
                )
            named[name] = tenant.model_copy(update={"name": name})
        return named

    @field_validator("tenants")
    @classmethod
    def _own_uids(cls, value: dict[str, Tenant], info: ValidationInfo) -> dict[str, Tenant]:
        # Only a resolved policy is checked: which range is in force depends on the environment.
        if not all(t.resolved for t in value.values()):
            return value
        problems = run_as_problems(value)
        if problems:
            env = (info.context or {}).get("environment")
            where = f" (EXECQ_ENV={env})" if env else ""
            raise ValueError(f"run_as{where}: " + "; ".join(problems))
        return value

    def get(self, name: str) -> Tenant | None:
        """The tenant called `name`, or None."""
        return self.tenants.get(name)

    @property
    def largest_timeout_s(self) -> float:
        """The longest wall-clock ceiling of any tenant (sizes the visibility timeout)."""
        return max(t.limits.timeout_s for t in self.tenants.values())

    @property
    def as_written(self) -> TenantsFile:
        """The file as written, overrides included, whatever environment it was resolved for."""
        return self._source or self

    @property
    def environment(self) -> Environment | None:
        """The environment this file's policy was resolved for, or None if never resolved."""
        return self._environment

    def for_env(self, env: Environment | str) -> TenantsFile:
        """Every tenant's effective policy in `env` (raises ValueError for an unknown env)."""
        environment = Environment(env)
        source = self.as_written
        resolved = TenantsFile.model_validate(
            {"tenants": {n: t.effective(environment) for n, t in source.tenants.items()}},
            context={"environment": environment.value},
        )
        resolved._source = source
        resolved._environment = environment
        return resolved


def run_as_problems(tenants: Mapping[str, Tenant]) -> list[str]:
    """What breaks "one uid per pool process, never shared between tenants": a sentence each."""
    problems = []
    ranged = sorted(
        ((name, t.run_as) for name, t in tenants.items() if t.run_as is not None),
        key=lambda item: item[1].uid_min,
    )
    for i, (name, run_as) in enumerate(ranged):
        if tenants[name].concurrency > run_as.uids:
            problems.append(
                f"tenant {name!r} has concurrency {tenants[name].concurrency} but its uid "
                f"range {run_as.uid_range} holds {run_as.uids} (one uid per pool process)"
            )
        for other, theirs in ranged[i + 1 :]:
            if theirs.uid_min > run_as.uid_max:
                break
            last = min(run_as.uid_max, theirs.uid_max)
            shared = f"uid {last}" if last == theirs.uid_min else f"uids {theirs.uid_min}-{last}"
            problems.append(
                f"tenants {name!r} ({run_as.uid_range}) and {other!r} ({theirs.uid_range}) "
                f"overlap: both would run commands as {shared}"
            )
    return problems


def host_conflicts(tenants: TenantsFile | Iterable[Tenant]) -> list[str]:
    """run_as ranges that include an account of this host: a sentence each (empty: none).

    A command would run as that account and reach its files. It depends on the host, not the
    file, so it is checked where a worker or `execq config check` runs, not when loading.
    """
    accounts = sorted({(entry.pw_uid, entry.pw_name) for entry in pwd.getpwall()})
    found = []
    for tenant in tenants.tenants.values() if isinstance(tenants, TenantsFile) else tenants:
        run_as = tenant.run_as
        if run_as is None:
            continue
        hits = [f"{n!r} (uid {u})" for u, n in accounts if run_as.uid_min <= u <= run_as.uid_max]
        if hits:
            more = f" and {len(hits) - 5} more" if len(hits) > 5 else ""
            found.append(
                f"tenant {tenant.name!r}: run_as uid range {run_as.uid_range} includes the "
                f"existing account{'s' if len(hits) > 1 else ''} {', '.join(hits[:5])}{more} "
                "of this host"
            )
    return found


def tenants_json_schema() -> dict[str, Any]:
    """The JSON Schema of the tenants file, as published in `config/tenants.schema.json`."""
    schema = TenantsFile.model_json_schema()
    return {
        "$schema": JSON_SCHEMA_DIALECT,
        **schema,
        "title": "execq tenants file",
        "description": (
            "Tenant pools, allow-lists, limit ceilings and argument policy; "
            "`environments` overrides them per EXECQ_ENV. "
            "Regenerate with `execq config schema > config/tenants.schema.json`."
        ),
    }


def load_tenants(path: Path, env: Environment | str | None = None) -> TenantsFile:
    """Read, validate and resolve a tenants file for an environment.

    `env` None means the environment in `EXECQ_ENV` (default `dev`), read by the same rules
    as `Settings.env`, so a process that reads its settings and this file agrees on both.
    Raises ConfigInvalid naming the file and field (or the setting).
    """
    if env is None:
        environment = load_env_settings().env
    else:
        try:
            environment = Environment(env)
        except ValueError:
            known = ", ".join(e.value for e in Environment)
            raise ConfigInvalid(
                f"invalid setting EXECQ_ENV: {env!r} is not one of {known}"
            ) from None
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigInvalid(f"invalid setting EXECQ_TENANTS_FILE: {path} does not exist") from None
    except yaml.YAMLError as exc:
        raise ConfigInvalid(f"invalid tenants file {_yaml_problem(path, exc)}") from None
    except OSError as exc:
        raise ConfigInvalid(
            f"invalid setting EXECQ_TENANTS_FILE: cannot read {path}: {exc}"
        ) from None
    if not isinstance(raw, dict):
        raise ConfigInvalid(f"invalid tenants file {path}: expected a mapping with `tenants:`")
    try:
        return TenantsFile.model_validate(raw).for_env(environment)
    except ValidationError as exc:
        detail = describe_validation_error(exc, prefix="")
        raise ConfigInvalid(f"invalid tenants file {path}:\n{detail}") from None


def _yaml_problem(path: Path, exc: yaml.YAMLError) -> str:
    """`FILE:LINE:COLUMN: what is wrong`, on one line (PyYAML's own text spans several and
    names no file)."""
    mark = getattr(exc, "problem_mark", None)
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
    problem = getattr(exc, "problem", None) or str(exc)
    context = getattr(exc, "context", None)
    return f"{where}: {f'{context}: ' if context else ''}{problem}".replace("\n", " ")
