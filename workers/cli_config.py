"""`execq config`: check a tenants file and show the policy it gives each tenant."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.text import Text

from producer import dangerous, policy
from producer.action_model import placeholders
from producer.settings import (
    ConfigInvalid,
    Environment,
    load_env_settings,
    load_policy_settings,
)
from producer.tenants import Tenant, TenantsFile, host_conflicts, load_tenants, tenants_json_schema
from workers.clikit import JsonOpt, handled, out

config_app = typer.Typer(
    help=(
        "The tenants file: validate it and see the policy each tenant gets.\n\n"
        "A tenant's `environments:` entry for dev, staging or prod overrides its policy when "
        "EXECQ_ENV names that environment: lists (executables, deny_args, env_allow, "
        "snapshot_roots) and mappings (deny_options, actions) are replaced, limits are merged "
        "field by field. A deny_args entry is a regex for every executable, "
        "{executable: /bin/rm, pattern: '^-rf$'} for one, or {executable: /bin/rm} to refuse "
        "that one outright; deny_options refuses an option in every spelling a program accepts."
    ),
    no_args_is_help=True,
)


@config_app.command("check")
@handled
def check(
    file: Annotated[
        Path | None,
        typer.Argument(
            help="Tenants file to check (default: EXECQ_TENANTS_FILE, else config/tenants.yaml).",
            show_default=False,
        ),
    ] = None,
    env: Annotated[
        Environment | None,
        typer.Option(
            "--env",
            help="Environment whose overrides apply (default: EXECQ_ENV, else dev).",
            show_default=False,
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Validate a tenants file and print each tenant's effective policy for an environment.

    Exit 0 when the file is valid; 2, naming the file and field, when it is not (also when a
    run_as uid range includes an account of this host). Try `execq config check --env prod`
    before deploying a change to production.
    """
    # Only the two settings that choose the policy: a bad broker URL must not hide it. A file
    # named here is checked from anywhere; without one, the project's is looked for.
    if file is None:
        settings = load_policy_settings()
        file, env = settings.tenants_file, env if env is not None else settings.env
    elif env is None:
        env = load_env_settings().env
    tenants = load_tenants(file, env=env)
    conflicts = host_conflicts(tenants)
    if conflicts:
        detail = "\n".join(f"  {line}" for line in conflicts)
        raise ConfigInvalid(f"invalid tenants file {file} on this host:\n{detail}")
    if as_json:
        print(json.dumps(_as_json(file, env, tenants)))
        return
    out.print(
        Text.assemble(
            (str(file), "bold"),
            f": valid, {len(tenants.tenants)} tenant(s); effective policy for EXECQ_ENV=",
            (env.value, "bold"),
        ),
        soft_wrap=True,
    )
    written = tenants.as_written
    for name, tenant in tenants.tenants.items():
        overridden = written.tenants[name].environments.get(env) is not None
        out.print()
        _print_tenant(tenant, env if overridden else None)
        for warning in warnings(tenant):
            out.print(Text.assemble(("  warning: ", "bold yellow"), warning), soft_wrap=True)


@config_app.command("schema")
@handled
def schema(as_json: JsonOpt = False) -> None:
    """Print the tenants file's JSON Schema (it is always JSON; --json is accepted for symmetry).

    Editors validate and complete the file with it: the shipped config/tenants.schema.json is
    this output, and config/tenants.yaml points at it in its first line.
    """
    print(json.dumps(tenants_json_schema(), indent=2))


def deny_rules(tenant: Tenant) -> list[str]:
    """The tenant's deny_args as the rule names a refusal carries, scope noted."""
    rules = []
    for entry in tenant.deny_args:
        if isinstance(entry, str):
            rules.append(f"deny_args:{entry}")
        elif entry.pattern is None:
            rules.append(entry.rule)
        else:
            rules.append(f"{entry.rule} (only {entry.executable})")
    return rules


def _print_tenant(tenant: Tenant, overridden: Environment | None) -> None:
    note = f"; {overridden.value} overrides applied" if overridden else ""
    out.print(
        Text.assemble(
            ("tenant ", "bold"),
            (tenant.name, "bold cyan"),
            f"  (queue {tenant.queue}, concurrency {tenant.concurrency}{note})",
        ),
        soft_wrap=True,
    )
    limits = " ".join(f"{k}={v:g}" for k, v in tenant.limits.model_dump().items())
    rows: list[tuple[str, list[str]]] = [
        ("executables", list(tenant.executables)),
        ("deny", deny_rules(tenant) or ["none"]),
        ("limits", [limits]),
        ("raw_argv", ["allowed" if tenant.raw_argv else "refused: actions only"]),
        ("actions", sorted(tenant.actions) or ["none"]),
        ("deny_options", _deny_options(tenant) or ["none"]),
        ("env_allow", [", ".join(tenant.env_allow) or "none"]),
        ("max_retries", [str(tenant.max_retries)]),
        ("network", ["allowed" if tenant.network else "refused"]),
        ("run_as", [_run_as(tenant)]),
        ("filesystem", [_filesystem(tenant)]),
        ("max_concurrent", [str(tenant.max_concurrent or "not set")]),
        ("submit_rate", [_rate(tenant)]),
        ("snapshot_roots", list(tenant.snapshot_roots) or ["none (snapshots refused)"]),
    ]
    for label, values in rows:
        for i, value in enumerate(values):
            # Plain text: patterns such as `[rR]` must not be read as Rich markup.
            out.print(f"  {label if i == 0 else '':<15} {value}", markup=False, soft_wrap=True)


def _deny_options(tenant: Tenant) -> list[str]:
    return [f"{exe}: {' '.join(opts)}" for exe, opts in tenant.deny_options.items()]


def warnings(tenant: Tenant) -> list[str]:
    """What a valid file still leaves open or contradicts: a sentence each."""
    found = dangerous.raw_argv_warnings(
        tenant.name, tenant.executables, tenant.deny_options, tenant.raw_argv
    )
    for name, action in sorted(tenant.actions.items()):
        for kind, template in (("argv", action.argv), ("compensate", action.compensate)):
            if template is None:
                continue
            # The template's own literal words meet the same rules as any argv: a rule that
            # refuses one of them refuses every run of the action.
            literal = tuple(t for t in template if not placeholders([t]))
            hit = policy.denied_option(literal, tenant)
            denial = policy.denied(kind, literal, tenant)
            if hit is not None or denial is not None:
                why = f"the option {hit.option}" if hit else f"rule {denial.rule}"  # type: ignore[union-attr]
                found.append(
                    f"tenant {tenant.name!r}: action {name!r} can never run: its {kind} "
                    f"template is refused by the tenant's own {why}"
                )
    return found


def _run_as(tenant: Tenant) -> str:
    r = tenant.run_as
    if r is None:
        return "not set (the worker's own user)"
    return f"uid {r.uid_min}-{r.uid_max}, gid {r.gid}"


def _filesystem(tenant: Tenant) -> str:
    view = tenant.filesystem
    if view is None:
        return "the host's"
    parts = [f"bubblewrap ({'required' if view.required else 'preferred'})"]
    parts.append(f"private tmp {view.tmp_mb} MB")
    if view.writable:
        parts.append("writable " + " ".join(view.writable))
    if view.hidden:
        parts.append("hidden " + " ".join(view.hidden))
    return ", ".join(parts)


def _rate(tenant: Tenant) -> str:
    rate = tenant.submit_rate
    return "not set" if rate is None else f"{rate.per_s:g}/s, burst {rate.burst}"


def _as_json(file: Path, env: Environment, tenants: TenantsFile) -> dict[str, Any]:
    return {
        "file": str(file),
        "environment": env.value,
        "valid": True,
        "tenants": {
            name: {
                **t.model_dump(mode="json", exclude={"name", "environments"}),
                "queue": t.queue,
                "deny_rules": deny_rules(t),
                "warnings": warnings(t),
            }
            for name, t in tenants.tenants.items()
        },
    }
