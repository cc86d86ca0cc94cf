"""Actions: named command templates with typed parameters, as a tenant defines them.

Callers send an action's name and parameters instead of an argv (as Rundeck job options,
StackStorm action parameters and AWX surveys do). Each `{param}` placeholder fills part of
exactly one argv element, so a value can never become a second argument. This module is the
tenants-file side (model, template syntax, load-time checks); `producer.actions` fills them.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

if TYPE_CHECKING:
    from producer.tenants import Tenant

PARAM_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,63}$")
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
# One placeholder `{name}`, or a doubled brace standing for itself.
_TOKEN = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|[{}]")
MAX_PARAMS = 64
MAX_STRING_BYTES = 32 * 1024
# Integers outside a signed 64-bit range are refused: no program on the allow-list parses them.
INT64 = 2**63


@dataclass(frozen=True)
class Placeholder:
    """A `{name}` in a template element."""

    name: str


Segment = str | Placeholder


def parse_template(text: str) -> tuple[Segment, ...]:
    """A template element as literal text and placeholders; ValueError for bad braces."""
    out: list[Segment] = []
    literal: list[str] = []
    pos = 0
    for match in _TOKEN.finditer(text):
        literal.append(text[pos : match.start()])
        pos = match.end()
        token = match.group(0)
        if token in ("{{", "}}"):
            literal.append(token[0])
            continue
        name = match.group(1)
        if name is None:
            raise ValueError(f"{text!r}: a lone {token!r} (write {token * 2} for the character)")
        if not PARAM_NAME.fullmatch(name):
            raise ValueError(f"{text!r}: {{{name}}} is not a parameter name ({PARAM_NAME.pattern})")
        if literal:
            out.append("".join(literal))
            literal = []
        out.append(Placeholder(name))
    literal.append(text[pos:])
    if "".join(literal):
        out.append("".join(literal))
    return tuple(out)


def placeholders(texts: tuple[str, ...] | list[str]) -> set[str]:
    """The parameter names the templates use."""
    return {s.name for t in texts for s in parse_template(t) if isinstance(s, Placeholder)}


def _templates(value: tuple[str, ...]) -> tuple[str, ...]:
    for text in value:
        parse_template(text)
    return value


def valid_regex(pattern: str) -> str:
    """`pattern` if it compiles, else ValueError saying why (shared by the tenants file)."""
    try:
        re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"{pattern!r} is not a valid regex: {exc}") from None
    return pattern


def absolute_dirs(value: tuple[str, ...]) -> tuple[str, ...]:
    """`value` if every entry is an absolute directory other than /, else ValueError."""
    for path in value:
        if not path.startswith("/") or path.rstrip("/") == "":
            raise ValueError(f"{path!r} is not an absolute directory other than /")
    return value


Templates = Annotated[tuple[str, ...], AfterValidator(_templates)]
Roots = Annotated[tuple[str, ...], AfterValidator(absolute_dirs)]
Regex = Annotated[str, AfterValidator(valid_regex)]
ParamType = Literal["string", "integer", "boolean", "path"]
ParamValue = str | int | bool

# Which constraints make sense for which type (anything else is a mistake in the file).
_ONLY_FOR: dict[str, tuple[str, ...]] = {
    "pattern": ("string",),
    "max_length": ("string",),
    "enum": ("string", "integer"),
    "minimum": ("integer",),
    "maximum": ("integer",),
    "under": ("path",),
    "secret": ("string",),
}


class ActionParam(BaseModel):
    """One typed parameter of an action; a value breaking a constraint is refused."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: ParamType
    description: str = ""
    pattern: Regex | None = Field(
        default=None, description="string: the whole value must match (fullmatch)."
    )
    enum: tuple[str | int, ...] | None = Field(
        default=None, description="string or integer: the only values accepted."
    )
    max_length: Annotated[int, Field(ge=1, le=MAX_STRING_BYTES)] | None = Field(
        default=None, description="string: most characters (256 when left out)."
    )
    minimum: int | None = None
    maximum: int | None = None
    under: Roots = Field(
        default=(),
        description="path: the value, symlinks resolved, must lie strictly below one of these.",
    )
    allow_dash: bool = Field(
        default=False, description="Accept a value beginning with '-' (refused otherwise)."
    )
    secret: bool = Field(
        default=False,
        description="string: usable only in the action's env; sealed like secrets, never stored.",
    )
    default: ParamValue | None = Field(
        default=None, description="Used when the caller leaves the parameter out."
    )

    @model_validator(mode="after")
    def _consistent(self) -> ActionParam:
        for field, types in _ONLY_FOR.items():
            value = getattr(self, field)
            if value not in (None, (), False) and self.type not in types:
                raise ValueError(f"{field} applies to {' or '.join(types)} parameters only")
        if self.type == "path" and not self.under:
            raise ValueError("a path parameter needs `under` (the directories it must stay in)")
        if self.enum is not None:
            want = str if self.type == "string" else int
            for item in self.enum:
                if type(item) is not want:
                    raise ValueError(f"enum value {item!r} is not a {self.type}")
        if self.minimum is not None and self.maximum is not None and self.minimum > self.maximum:
            raise ValueError(f"minimum {self.minimum} is above maximum {self.maximum}")
        return self

    def json_schema(self) -> dict[str, Any]:
        """This parameter as a JSON Schema (what `execq actions --json` and the gateway show)."""
        out: dict[str, Any] = {"type": "string" if self.type == "path" else self.type}
        if self.description:
            out["description"] = self.description
        if self.type == "string":
            out["maxLength"] = self.max_length or 256
            if self.pattern is not None:
                out["pattern"] = self.pattern
            if self.secret:
                out["writeOnly"] = True
        if self.type == "path":
            out["pattern"] = "^/"
            out["x-under"] = list(self.under)
        if self.enum is not None:
            out["enum"] = list(self.enum)
        if self.minimum is not None:
            out["minimum"] = self.minimum
        if self.maximum is not None:
            out["maximum"] = self.maximum
        if self.default is not None:
            out["default"] = self.default
        if self.allow_dash:
            out["x-allow-dash"] = True
        return out


class ActionLimits(BaseModel):
    """An action's own ceilings (at most the tenant's); a spec may ask for less."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    timeout_s: Annotated[float, Field(gt=0, le=86_400)] | None = None
    cpu_s: Annotated[int, Field(gt=0, le=86_400)] | None = None
    memory_mb: Annotated[int, Field(ge=8, le=1_048_576)] | None = None


class Action(BaseModel):
    """A named command template of a tenant: argv with `{param}` placeholders and its params."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    description: str = ""
    argv: Templates = Field(description="argv[0] is a literal allow-listed path.")
    params: dict[str, ActionParam] = Field(default_factory=dict)
    env: dict[str, str] = Field(
        default_factory=dict, description="Set in the command's env; values may use params."
    )
    env_allow: tuple[str, ...] | None = Field(
        default=None,
        description="Names a spec's env may set for this action (the tenant's list otherwise).",
    )
    compensate: Templates | None = Field(
        default=None, description="The undo command, with the same placeholders."
    )
    limits: ActionLimits = ActionLimits()
    retry_safe: bool = False
    rollback_on_failure: bool = False
    snapshot_paths: Templates = ()

    @model_validator(mode="after")
    def _well_formed(self) -> Action:
        if not self.argv:
            raise ValueError("argv must not be empty")
        if len(self.params) > MAX_PARAMS:
            raise ValueError(f"{len(self.params)} params, more than {MAX_PARAMS}")
        for name in self.params:
            if not PARAM_NAME.fullmatch(name):
                raise ValueError(f"parameter name {name!r} must match {PARAM_NAME.pattern}")
        for kind, texts in (("argv", self.argv), ("compensate", self.compensate or ())):
            if texts and placeholders([texts[0]]):
                raise ValueError(f"{kind}[0] must be a literal path, not a placeholder")
            if texts and not texts[0].startswith("/"):
                raise ValueError(f"{kind}[0] {texts[0]!r} is not an absolute path")
        for name in [*self.env, *(self.env_allow or ())]:
            if not ENV_NAME.fullmatch(name):
                raise ValueError(f"{name!r} is not a valid environment variable name")
        _templates(tuple(self.env.values()))
        for path in self.snapshot_paths:
            if not path.startswith("/"):
                raise ValueError(f"snapshot path {path!r} must begin with a literal /")
        used = placeholders([*self.argv, *(self.compensate or ()), *self.snapshot_paths])
        in_env = placeholders(list(self.env.values()))
        unknown = sorted((used | in_env) - set(self.params))
        if unknown:
            raise ValueError(f"placeholders {unknown} name no parameter of the action")
        for name, param in self.params.items():
            if param.secret and name in used:
                raise ValueError(
                    f"secret parameter {name!r} may be used only in env (argv, compensate "
                    "and snapshot paths are stored and shown)"
                )
            if param.secret and param.default is not None:
                raise ValueError(f"secret parameter {name!r} cannot have a default")
        if self.rollback_on_failure and self.compensate is None and not self.snapshot_paths:
            raise ValueError("rollback_on_failure needs compensate or snapshot_paths")
        return self

    def misfit(self, tenant: Tenant) -> str | None:
        """Why this action cannot belong to `tenant` (a program or limit it does not allow)."""
        listed = {os.path.realpath(p) for p in tenant.executables}
        for kind, texts in (("argv", self.argv), ("compensate", self.compensate)):
            if texts and os.path.realpath(texts[0]) not in listed:
                return f"{kind}[0] {texts[0]} is not on the tenant's executables"
        for name in ("timeout_s", "cpu_s", "memory_mb"):
            mine, ceiling = getattr(self.limits, name), getattr(tenant.limits, name)
            if mine is not None and mine > ceiling:
                return f"limits.{name}={mine} is above the tenant's ceiling of {ceiling}"
        return None

    def params_schema(self) -> dict[str, Any]:
        """The parameters as one JSON Schema object."""
        required = [n for n, p in self.params.items() if p.default is None]
        return {
            "type": "object",
            "properties": {n: p.json_schema() for n, p in self.params.items()},
            "required": required,
            "additionalProperties": False,
        }


def rename_allowed_env(value: Any) -> Any:
    """Accept the first release's `allowed_env` as `env_allow` (null: the default list)."""
    if isinstance(value, dict) and "allowed_env" in value:
        value = dict(value)
        if "env_allow" in value:
            raise ValueError("give env_allow or its old name allowed_env, not both")
        value["env_allow"] = value.pop("allowed_env")
    return value
