"""Tenant policy: may this spec run? Checked at submit and again by the worker (authz)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from functools import lru_cache

from producer import actions, dangerous, options
from producer.action_model import Action
from producer.errors import ConfigError, PolicyDenied, UnknownTenant
from producer.spec import CommandSpec
from producer.tenants import Tenant, TenantsFile


@dataclass(frozen=True)
class EffectiveLimits:
    """The limits one command runs with: its own requests, capped by the tenant's ceilings."""

    timeout_s: float
    cpu_s: int
    memory_mb: int
    processes: int
    output_kb: int
    file_mb: int
    open_files: int
    disk_mb: int


def _real(path: str) -> str:
    # Symlinks are resolved on both sides so /bin/echo and /usr/bin/echo are one program;
    # a path that does not exist here is compared as written (the worker checks again).
    # Never cached for what a spec names: a link can be re-pointed between two checks.
    return os.path.realpath(path)


@lru_cache(maxsize=4096)
def _real_listed(path: str) -> str:
    # The tenants file's own paths: resolved once per process (the file is trusted config).
    return os.path.realpath(path)


def tenant_for(spec_tenant: str, tenants: TenantsFile) -> Tenant:
    """The spec's tenant, or UnknownTenant naming the tenants that exist."""
    tenant = tenants.get(spec_tenant)
    if tenant is None:
        known = ", ".join(sorted(tenants.tenants))
        raise UnknownTenant(f"tenant {spec_tenant!r} is not defined (known: {known})")
    return tenant


def allowed(argv0: str, tenant: Tenant) -> bool:
    """Whether argv[0] names an allow-listed program once symlinks are resolved."""
    target = _real(argv0)
    return any(target == _real_listed(entry) for entry in tenant.executables)


@dataclass(frozen=True)
class Denial:
    """Which deny_args entry refuses an argv: its rule name and a sentence saying why."""

    rule: str
    message: str


def denied(kind: str, argv: tuple[str, ...], tenant: Tenant) -> Denial | None:
    """The deny_args entry that refuses `argv`, or None.

    An executable refused outright wins whatever its place in the list (it is the stronger
    statement); then entries apply in order, a scoped one only to its own executable.
    """
    target = _real(argv[0])
    scoped = [
        e
        for e in tenant.deny_args
        if not isinstance(e, str) and _real_listed(e.executable) == target
    ]
    for rule in scoped:
        if rule.pattern is None:
            return Denial(
                rule.rule,
                f"{kind}[0] {argv[0]!r} is refused outright by tenant {tenant.name!r}'s deny_args",
            )
    for entry in tenant.deny_args:
        if isinstance(entry, str):
            pattern, where = entry, ""
        elif entry in scoped and entry.pattern is not None:
            pattern, where = entry.pattern, f" for {entry.executable}"
        else:
            continue
        if any(re.search(pattern, arg) for arg in argv[1:]):
            return Denial(
                f"deny_args:{pattern}",
                f"{kind} has an argument matching tenant {tenant.name!r}'s deny_args "
                f"{pattern!r}{where}",
            )
    return None


def denied_option(argv: tuple[str, ...], tenant: Tenant) -> options.OptionHit | None:
    """The first argument spelling an option the tenant's deny_options refuses for argv[0]."""
    target = _real(argv[0])
    spellings = [
        option
        for executable, listed in tenant.deny_options.items()
        if _real_listed(executable) == target
        for option in listed
    ]
    if not spellings:
        return None
    # tar, ps, ar: a first argument without a dash is itself a bundle of short options.
    program = dangerous.lookup(target)
    old_style = program is not None and program.old_style_first
    return options.denied_option(argv[1:], spellings, old_style_first=old_style)


def _check_argv(kind: str, argv: tuple[str, ...], tenant: Tenant) -> None:
    _require_resolved(tenant)
    if not allowed(argv[0], tenant):
        raise PolicyDenied(
            f"{kind}[0] {argv[0]!r} is not on the executables allow-list of tenant {tenant.name!r}",
            rule="executables",
        )
    denial = denied(kind, argv, tenant)
    # An executable refused outright is the stronger statement: it is named first.
    if denial is not None and denial.rule.startswith("deny_executable:"):
        raise PolicyDenied(denial.message, rule=denial.rule)
    hit = denied_option(argv, tenant)
    if hit is not None:
        raise PolicyDenied(
            f"{kind}: {options.describe(hit, argv[0])} for tenant {tenant.name!r}",
            rule=f"deny_options:{hit.option}",
        )
    if denial is not None:
        raise PolicyDenied(denial.message, rule=denial.rule)


def _require_resolved(tenant: Tenant) -> None:
    # Fail closed: judging by a tenant whose per-environment overrides were never applied
    # would quietly use the base policy, e.g. let prod run what only dev allows.
    if not tenant.resolved:
        raise ConfigError(
            f"tenant {tenant.name!r} still has `environments:` overrides to apply; load the "
            "tenants file with load_tenants(path, env=...) or TenantsFile.for_env(env)"
        )


def check_compensate(argv: tuple[str, ...], tenant: Tenant) -> None:
    """The compensation's argv against the policy the worker holds when it runs."""
    _check_argv("compensate", argv, tenant)


def check(spec: CommandSpec, tenants: TenantsFile) -> Tenant:
    """Return the spec's tenant if the (resolved) spec may run, else raise PolicyDenied."""
    tenant = tenant_for(spec.tenant, tenants)
    check_tenant(spec, tenant)
    return tenant


def check_tenant(spec: CommandSpec, tenant: Tenant) -> None:
    """Raise PolicyDenied naming the rule unless `tenant`'s policy lets `spec` run.

    `spec` is a raw argv, or an action already filled in (`actions.resolve`): the resolved
    argv meets every rule a raw one meets.
    """
    if tenant.require_idempotency_key and spec.idempotency_key is None:
        raise PolicyDenied(
            f"tenant {tenant.name!r} requires an idempotency key on every command "
            "(require_idempotency_key: true)",
            rule="idempotency_key",
        )
    action = None
    if spec.action is None:
        if not tenant.raw_argv:
            names = ", ".join(sorted(tenant.actions)) or "none defined"
            raise PolicyDenied(
                f"tenant {tenant.name!r} runs only actions (raw_argv: false); send an action "
                f"name and params instead of an argv (actions: {names})",
                rule="raw_argv",
            )
    else:
        action = actions.action_of(spec, tenant)
        if not spec.argv:
            raise ValueError("check_tenant needs the resolved spec (actions.resolve)")
    _check_argv("argv", spec.argv, tenant)
    if spec.compensate is not None:
        _check_argv("compensate", spec.compensate, tenant)
    ceilings = tenant.limits
    comp = spec.compensate_limits
    for name, asked, ceiling in (
        ("timeout_s", spec.timeout_s, ceilings.timeout_s),
        ("cpu_s", spec.cpu_s, ceilings.cpu_s),
        ("memory_mb", spec.memory_mb, ceilings.memory_mb),
        ("compensate_limits.timeout_s", comp.timeout_s if comp else None, ceilings.timeout_s),
        ("compensate_limits.cpu_s", comp.cpu_s if comp else None, ceilings.cpu_s),
        ("compensate_limits.memory_mb", comp.memory_mb if comp else None, ceilings.memory_mb),
    ):
        if asked is not None and asked > ceiling:
            raise PolicyDenied(
                f"{name}={asked} is above tenant {tenant.name!r}'s ceiling of {ceiling}",
                rule=f"limits.{name.rpartition('.')[2]}",
            )
    if spec.max_retries > tenant.max_retries:
        raise PolicyDenied(
            f"max_retries={spec.max_retries} is above tenant {tenant.name!r}'s ceiling of "
            f"{tenant.max_retries}",
            rule="max_retries",
        )
    for path in spec.snapshot_paths:
        if not snapshot_allowed(path, tenant):
            roots = ", ".join(tenant.snapshot_roots) or "none configured"
            raise PolicyDenied(
                f"snapshot path {path!r} is not under tenant {tenant.name!r}'s snapshot_roots "
                f"({roots})",
                rule="snapshot_roots",
            )
    _check_env_names(spec, tenant, action)


def _check_env_names(spec: CommandSpec, tenant: Tenant, action: Action | None) -> None:
    # By allow-list: a name nobody thought of (TAR_OPTIONS, GIT_SSH_COMMAND...) is refused.
    # An action's own env is the tenants file's, not the caller's, so it is not limited.
    fixed = set(action.env) if action is not None else set()
    allow, owner = tenant.env_allow, f"tenant {tenant.name!r}"
    if action is not None and action.env_allow is not None:
        allow, owner = action.env_allow, f"action {spec.action!r}"
    extra = sorted(set(spec.env) - fixed - set(allow))
    if extra:
        listed = ", ".join(allow) or "none"
        raise PolicyDenied(
            f"env {', '.join(extra)} not in {owner}'s env_allow ({listed})",
            rule="env_allow",
        )


def snapshot_allowed(path: str, tenant: Tenant) -> bool:
    """Whether `path` lies under one of the tenant's snapshot roots once symlinks resolve.

    Resolved now, not only when written: a symlink planted under a root must not let a
    snapshot (and its restore, which runs with the worker's rights) reach outside it.
    """
    target = os.path.realpath(path)
    for root in tenant.snapshot_roots:
        real_root = os.path.realpath(root)
        if target == real_root or target.startswith(real_root.rstrip("/") + "/"):
            return True
    return False


def effective_limits(
    tenant: Tenant, *, timeout_s: float | None, cpu_s: int | None, memory_mb: int | None
) -> EffectiveLimits:
    """The command's requests where given, the tenant's ceilings otherwise (never above)."""
    c = tenant.limits
    return EffectiveLimits(
        timeout_s=min(timeout_s or c.timeout_s, c.timeout_s),
        cpu_s=min(cpu_s or c.cpu_s, c.cpu_s),
        memory_mb=min(memory_mb or c.memory_mb, c.memory_mb),
        processes=c.processes,
        output_kb=c.output_kb,
        file_mb=c.file_mb,
        open_files=c.open_files,
        disk_mb=c.disk_mb,
    )
