"""`execq actions` and `--param k=v`: a tenant's named command templates on the command line."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from producer.action_model import Action, ParamValue
from producer.errors import SpecError
from producer.tenants import TenantsFile
from workers.cli_show import load
from workers.clikit import JsonOpt, fail, handled, out

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def parse_params(
    pairs: list[str], tenants: TenantsFile, tenant: str, action: str
) -> dict[str, ParamValue]:
    """`--param k=v` pairs, each value converted by its parameter's type.

    A parameter (or action) the file does not define keeps its text: the submit is then
    refused by policy, recorded and audited like any refusal. A tenant it does not define is
    a malformed spec: the submit stores nothing.
    """
    found = tenants.get(tenant)
    defined = found.actions.get(action) if found is not None else None
    params: dict[str, ParamValue] = {}
    for pair in pairs:
        name, sep, text = pair.partition("=")
        if not sep or not name:
            raise SpecError(f"--param takes NAME=VALUE, got {pair!r}")
        if name in params:
            raise SpecError(f"--param {name} given twice")
        param = defined.params.get(name) if defined is not None else None
        kind = param.type if param is not None else "string"
        if kind == "integer":
            try:
                params[name] = int(text, 10)
            except ValueError:
                raise SpecError(f"--param {name}={text!r}: {name} is an integer") from None
        elif kind == "boolean":
            if text.lower() not in _TRUE | _FALSE:
                raise SpecError(f"--param {name}={text!r}: {name} is true or false")
            params[name] = text.lower() in _TRUE
        else:
            params[name] = text
    return params


def action_json(name: str, action: Action) -> dict[str, Any]:
    """An action as `execq actions --json` prints it (and the gateway publishes it)."""
    return {
        "name": name,
        "description": action.description,
        "argv": list(action.argv),
        "compensate": list(action.compensate) if action.compensate is not None else None,
        "params": action.params_schema(),
        "retry_safe": action.retry_safe,
        "rollback_on_failure": action.rollback_on_failure,
    }


def _summary(action: Action) -> str:
    parts = []
    for name, param in action.params.items():
        schema = param.json_schema()
        bits: list[str] = [param.type]
        if "enum" in schema:
            bits.append("|".join(str(v) for v in schema["enum"]))
        if param.type == "integer" and (param.minimum is not None or param.maximum is not None):
            low = "" if param.minimum is None else param.minimum
            high = "" if param.maximum is None else param.maximum
            bits.append(f"{low}..{high}")
        if param.pattern:
            bits.append(f"/{param.pattern}/")
        if param.under:
            bits.append("under " + ", ".join(param.under))
        if param.secret:
            bits.append("secret")
        optional = "" if param.default is None else f"={param.default}"
        parts.append(f"{name}{optional} ({', '.join(bits)})")
    return "\n".join(parts) or "-"


@handled
def actions(
    tenant: Annotated[
        str | None, typer.Option("--tenant", "-t", help="Only this tenant's actions.")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """List the actions callers may run, with their parameters (JSON Schema with --json).

    Run one with [bold]execq submit --tenant acme --action greet --param name=bob[/].
    """
    _settings, tenants = load()
    names = [tenant] if tenant is not None else sorted(tenants.tenants)
    if tenant is not None and tenants.get(tenant) is None:
        fail(f"tenant {tenant!r} is not defined (known: {', '.join(sorted(tenants.tenants))})", 1)
    rows = []
    for name in names:
        found = tenants.tenants[name]
        for action_name, action in sorted(found.actions.items()):
            rows.append((name, found.raw_argv, action_name, action))
    if as_json:
        print(
            json.dumps(
                [{"tenant": t, "raw_argv": raw, **action_json(n, a)} for t, raw, n, a in rows],
                indent=2,
            )
        )
        return
    if not rows:
        out.print("no actions defined" + (f" for tenant {tenant}" if tenant else ""))
        return
    table = Table("tenant", "action", "description", "parameters", "argv")
    for t, _raw, n, a in rows:
        cells = (t, n, a.description, _summary(a), " ".join(a.argv))
        table.add_row(*(escape(c) for c in cells))
    out.print(table)
