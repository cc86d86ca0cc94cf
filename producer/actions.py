"""Filling an action: a spec naming a tenant's action and its params becomes a resolved spec.

Each parameter is checked against its type and constraints, then fills its placeholders; a
placeholder fills part of exactly one argv element, so no value can add an argument. The
resolved argv then meets every rule a raw argv meets (see `policy.check_tenant`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

from producer.action_model import Action, ActionParam, ParamValue, Placeholder, parse_template
from producer.errors import PolicyDenied
from producer.redaction import MaskLevel, Redactor
from producer.spec import CommandSpec, check_argv
from producer.tenants import Tenant

DEFAULT_MAX_LENGTH = 256


def action_of(spec: CommandSpec, tenant: Tenant) -> Action:
    """The tenant's action the spec names, or PolicyDenied (rule `action`) naming the known."""
    assert spec.action is not None
    action = tenant.actions.get(spec.action)
    if action is None:
        known = ", ".join(sorted(tenant.actions)) or "none"
        raise PolicyDenied(
            f"tenant {tenant.name!r} has no action {spec.action!r} (known: {known})",
            rule="action",
        )
    return action


def resolve(spec: CommandSpec, tenant: Tenant) -> CommandSpec:
    """The spec with its action filled in: argv, compensate, env, secrets, limits and flags.

    A raw-argv spec is returned as it is. Raises PolicyDenied naming the parameter and the
    rule it broke (`param:NAME:RULE`), or the action (`action`) when the tenant has none such.
    """
    if spec.action is None:
        return spec
    action = action_of(spec, tenant)
    texts = fill_values(spec.action, action, spec.params)
    secret_names = {n for n, p in action.params.items() if p.secret}
    env: dict[str, str] = {}
    secrets: dict[str, str] = {}
    for name, template in action.env.items():
        segments = parse_template(template)
        value = _fill(segments, texts)
        if any(isinstance(s, Placeholder) and s.name in secret_names for s in segments):
            secrets[name] = value
        else:
            env[name] = value
    clash = sorted((set(env) | set(secrets)) & (set(spec.env) | set(spec.secrets)))
    if clash:
        raise PolicyDenied(
            f"env {clash} is set by action {spec.action!r}; a caller cannot change it",
            rule="env_allow",
        )
    argv = fill(action.argv, texts)
    compensate = fill(action.compensate, texts) if action.compensate is not None else None
    for kind, made in (("argv", argv), ("compensate", compensate)):
        if made is not None:
            try:
                check_argv(kind, made)
            except ValueError as exc:
                raise PolicyDenied(f"action {spec.action!r}: {exc}", rule="argv_size") from None
    limits: dict[str, Any] = {}
    for name in ("timeout_s", "cpu_s", "memory_mb"):
        ceiling, asked = getattr(action.limits, name), getattr(spec, name)
        if ceiling is not None and asked is not None and asked > ceiling:
            raise PolicyDenied(
                f"{name}={asked} is above action {spec.action!r}'s ceiling of {ceiling}",
                rule=f"limits.{name}",
            )
        limits[name] = asked if asked is not None else ceiling
    used = _storable(action, _with_defaults(action, spec.params), {**secrets, **spec.secrets})
    return spec.model_copy(
        update={
            "argv": argv,
            "compensate": compensate,
            "snapshot_paths": fill(action.snapshot_paths, texts),
            "env": {**env, **spec.env},
            "secrets": {**secrets, **spec.secrets},
            "params": used,
            "retry_safe": spec.retry_safe or action.retry_safe,
            "rollback_on_failure": spec.rollback_on_failure or action.rollback_on_failure,
            **limits,
        }
    )


def storable(spec: CommandSpec, tenant: Tenant | None) -> CommandSpec:
    """A refused action spec as it may be stored: no secret parameter, the rest redacted.

    With no such action (or tenant) nobody can say which parameters are secret: none is kept.
    """
    action = tenant.actions.get(spec.action) if tenant and spec.action else None
    kept = _storable(action, spec.params, spec.secrets) if action is not None else {}
    return spec.model_copy(update={"params": kept})


def _storable(
    action: Action, params: Mapping[str, ParamValue], secrets: Mapping[str, str]
) -> dict[str, ParamValue]:
    # Secret parameters never reach the store; the others pass the redactor like output does
    # (a secret value given as a plain parameter by mistake is scrubbed all the same).
    redactor = Redactor(secrets, level=MaskLevel.OFF)
    out: dict[str, ParamValue] = {}
    for name, value in params.items():
        param = action.params.get(name)
        if param is not None and param.secret:
            continue
        out[name] = (redactor.scrub(value)[0] or "") if isinstance(value, str) else value
    return out


def fill(templates: tuple[str, ...], texts: Mapping[str, str]) -> tuple[str, ...]:
    """Each template element with its placeholders replaced: one element in, one out."""
    return tuple(_fill(parse_template(t), texts) for t in templates)


def _fill(segments: tuple[str | Placeholder, ...], texts: Mapping[str, str]) -> str:
    return "".join(texts[s.name] if isinstance(s, Placeholder) else s for s in segments)


def _with_defaults(action: Action, params: Mapping[str, ParamValue]) -> dict[str, ParamValue]:
    out = {n: p.default for n, p in action.params.items() if p.default is not None}
    out.update(params)
    return out


def fill_values(name: str, action: Action, params: Mapping[str, ParamValue]) -> dict[str, str]:
    """Each parameter's text as it fills a placeholder; PolicyDenied for any bad one."""
    unknown = sorted(set(params) - set(action.params))
    if unknown:
        known = ", ".join(sorted(action.params)) or "none"
        raise PolicyDenied(
            f"action {name!r} has no parameter {unknown[0]!r} (its parameters: {known})",
            rule=f"param:{unknown[0]}:unknown"[:64],
        )
    values = _with_defaults(action, params)
    texts: dict[str, str] = {}
    for pname, param in action.params.items():
        if pname not in values:
            raise PolicyDenied(
                f"action {name!r} needs parameter {pname!r} ({param.type})",
                rule=f"param:{pname}:missing",
            )
        texts[pname] = check_value(pname, param, values[pname])
    return texts


def check_value(name: str, param: ActionParam, value: ParamValue) -> str:
    """The text `value` fills in, or PolicyDenied saying which constraint of `name` it broke."""
    shown = "(secret)" if param.secret else repr(value)[:60]

    def refuse(rule: str, why: str) -> PolicyDenied:
        return PolicyDenied(f"parameter {name!r} = {shown} {why}", rule=f"param:{name}:{rule}")

    if param.type == "boolean":
        if not isinstance(value, bool):
            raise refuse("type", "is not a boolean (true or false)")
        return "true" if value else "false"
    if param.type == "integer":
        if isinstance(value, bool) or not isinstance(value, int):
            raise refuse("type", "is not an integer")
        if param.minimum is not None and value < param.minimum:
            raise refuse("minimum", f"is below the minimum {param.minimum}")
        if param.maximum is not None and value > param.maximum:
            raise refuse("maximum", f"is above the maximum {param.maximum}")
        text = str(value)
    else:
        if not isinstance(value, str):
            raise refuse("type", f"is not a {'path' if param.type == 'path' else 'string'}")
        text = _path(value, param, refuse) if param.type == "path" else value
        if param.type == "string":
            limit = param.max_length or DEFAULT_MAX_LENGTH
            if len(value) > limit:
                raise refuse("max_length", f"is {len(value)} characters, more than {limit}")
            if param.pattern is not None and not _fullmatch(param.pattern, value):
                raise refuse("pattern", f"does not match {param.pattern!r}")
    if param.enum is not None and value not in param.enum:
        raise refuse("enum", f"is not one of {list(param.enum)}")
    if text.startswith("-") and not param.allow_dash:
        raise refuse("dash", "begins with '-' and would read as an option (allow_dash is off)")
    return text


def _path(value: str, param: ActionParam, refuse: Any) -> str:
    if not value.startswith("/") or "\x00" in value:
        raise refuse("absolute", "is not an absolute path")
    # Resolved now, and the resolved path is what the command gets: a symlink under a root
    # cannot lead it elsewhere, and `..` cannot climb out.
    target = os.path.realpath(value)
    for root in param.under:
        real_root = os.path.realpath(root).rstrip("/")
        if target.startswith(real_root + "/"):
            return target
    raise refuse("under", f"resolves to {target!r}, not below {' or '.join(param.under)}")


def _fullmatch(pattern: str, value: str) -> bool:
    return re.fullmatch(pattern, value) is not None
