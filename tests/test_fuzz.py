"""Property-based fuzzing of what takes untrusted input: the spec, the policy, a message.

Each may refuse (SpecError, PolicyDenied, UnknownTenant, BadMessage) but never crash with
anything else, and what it accepts is safe to store, hash and run.
"""

from __future__ import annotations

import contextlib
import json
import re
import uuid
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from producer import policy
from producer.errors import PolicyDenied, SpecError, UnknownTenant
from producer.sealing import Sealer
from producer.spec import MAX_LIMIT_INT, CommandSpec, cmd_hash
from producer.tenants import Tenant, TenantsFile
from workers.binding import Delivery
from workers.pipeline import BadMessage, decode
from workers.pipeline import _text as valid_text

FUZZ = settings(max_examples=300, deadline=None)
# The `tenants` fixture is read-only, so sharing it between examples is safe.
FUZZ_WITH_FIXTURE = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# --- strategies -----------------------------------------------------------------------------

# Every code point, lone surrogates included (st.text() leaves those out by default).
any_char = st.characters(exclude_categories=())
nasty = st.sampled_from(["\x00", "\ud800", "\udfff", "\n", "=", "/", "..", "\u202e", " "])
any_text = st.one_of(
    st.text(any_char, max_size=12),
    st.lists(st.one_of(nasty, st.text(any_char, max_size=3)), max_size=4).map("".join),
)
# Text a child, a store and a JSON document can hold: no NUL, no lone surrogate.
clean_text = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\x00"))
huge_ints = st.sampled_from([0, -1, 2**31 - 1, 2**31, 2**63, 2**64, 10**30, 10**400, -(10**400)])
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    huge_ints,
    st.floats(),  # nan, inf, -0.0, subnormals
    any_text,
    st.binary(max_size=8),
)
values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.lists(children, max_size=3).map(tuple),
        st.dictionaries(any_text, children, max_size=3),
    ),
    max_leaves=8,
)

paths = st.one_of(
    st.sampled_from(
        [
            "/bin/echo",
            "/bin/sh",
            "/bin/true",
            "/usr/bin/env",
            "/usr/bin/echo",
            "/bin/../bin/sh",
            "/bin/sh;id",
            "/bin/ech\u043e",
            "/nonexistent/x",
            "/tmp",
            "/tmp/x",
            "/",
            "/etc/passwd",
        ]
    ),
    any_text.map(lambda t: "/" + t),
    any_text,
)
argvs = st.lists(st.one_of(paths, any_text), max_size=5)
env_names = st.one_of(
    st.sampled_from(["LANG", "COLOR", "LD_PRELOAD", "PATH", "BASH_ENV", "A=B", "X\n", "1A", ""]),
    st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,20}", fullmatch=True),
    any_text,
)
envs = st.dictionaries(env_names, st.one_of(any_text, clean_text), max_size=4)
tenant_names = st.one_of(
    st.sampled_from(["alpha", "beta", "gamma", "Alpha", "alpha\n", "../alpha", "a" * 41]),
    st.from_regex(r"[a-z][a-z0-9_-]{0,39}", fullmatch=True),
    any_text,
)
keys = st.one_of(st.none(), st.text(st.characters(codec="ascii"), max_size=210), any_text)
limits_values = st.one_of(st.none(), st.integers(-2, 300), huge_ints, st.floats(), values)


def _field(specific: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly plausible values for one field, sometimes anything at all."""
    return st.one_of(specific, specific, values)


raw_specs = st.fixed_dictionaries(
    {},
    optional={
        "tenant": _field(tenant_names),
        "argv": _field(argvs),
        "idempotency_key": _field(keys),
        "timeout_s": _field(limits_values),
        "cpu_s": _field(limits_values),
        "memory_mb": _field(limits_values),
        "env": _field(envs),
        "secrets": _field(envs),
        "compensate": _field(st.one_of(st.none(), argvs)),
        "compensate_limits": _field(
            st.one_of(
                st.none(),
                st.fixed_dictionaries(
                    {},
                    optional={
                        "timeout_s": limits_values,
                        "cpu_s": limits_values,
                        "memory_mb": limits_values,
                        "other": values,
                    },
                ),
            )
        ),
        "snapshot_paths": _field(st.lists(paths, max_size=3)),
        "rollback_on_failure": _field(st.booleans()),
        "retry_safe": _field(st.booleans()),
        "max_retries": _field(st.integers(-2, 25)),
        "principal": _field(st.one_of(st.none(), any_text, st.text(max_size=210))),
        "unexpected": values,
    },
)

# Specs that are mostly valid, to reach the policy and the canonical form often.
ok_args = st.lists(
    st.one_of(st.sampled_from(["-rf", "$(id)", "; sh"]), clean_text.filter(lambda t: len(t) < 40)),
    max_size=4,
)
ok_env = st.dictionaries(
    st.from_regex(r"[A-Z][A-Z0-9_]{0,8}", fullmatch=True), clean_text, max_size=3
)
positive_ints = st.one_of(st.none(), st.integers(1, 300), st.integers(1, MAX_LIMIT_INT))
valid_ish_specs = st.fixed_dictionaries(
    {
        "tenant": st.sampled_from(["alpha", "beta", "gamma"]),
        "argv": st.tuples(paths, ok_args).map(lambda t: [t[0], *t[1]]),
    },
    optional={
        "idempotency_key": st.from_regex(r"[\x21-\x7e]{1,20}", fullmatch=True),
        "timeout_s": st.one_of(
            st.none(), st.floats(min_value=1e-3, max_value=1e6), st.integers(1, 100)
        ),
        "cpu_s": positive_ints,
        "memory_mb": positive_ints,
        "env": ok_env,
        "secrets": ok_env.map(lambda d: {f"S_{k}": v for k, v in d.items()}),
        "compensate": st.tuples(paths, ok_args).map(lambda t: [t[0], *t[1]]),
        "snapshot_paths": st.lists(paths, max_size=2),
        "rollback_on_failure": st.booleans(),
        "retry_safe": st.just(True),
        "max_retries": st.integers(0, 20),
        "principal": st.one_of(st.none(), clean_text.filter(lambda t: len(t) <= 200)),
    },
)


@st.composite
def one_bad_field(draw: st.DrawFn) -> dict[str, Any]:
    """A mostly valid spec with one field (or an unknown one) set to anything at all."""
    data = dict(draw(valid_ish_specs))
    name = draw(st.sampled_from([*CommandSpec.model_fields, "unexpected"]))
    data[name] = draw(values)
    return data


edge_ints = st.one_of(st.integers(-1, 2**70), huge_ints, st.booleans())
edge_floats = st.one_of(st.floats(), edge_ints)
edge_names = st.one_of(
    st.sampled_from(["X\n", "\nX", "LD_PRELOAD", "A=B", "PATH", "_", "A" * 128, "A" * 129]),
    st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,3}", fullmatch=True).map(lambda n: n + "\n"),
)
edge_text = st.one_of(st.text(max_size=8), st.text(any_char, max_size=8), nasty)
# Values of the right type at or past each field's limits.
EDGES: dict[str, st.SearchStrategy[Any]] = {
    "tenant": st.sampled_from(["alpha\n", "a" * 40, "a" * 41, "Alpha", "../a", "beta\n"]),
    "idempotency_key": st.sampled_from(["k" * 200, "k" * 201, "k\n", "k k", "\x7f", "\x00"]),
    "timeout_s": edge_floats,
    "cpu_s": edge_ints,
    "memory_mb": edge_ints,
    "max_retries": edge_ints,
    "env": st.dictionaries(edge_names, edge_text, max_size=2),
    "secrets": st.dictionaries(edge_names, edge_text, max_size=2),
    "principal": st.one_of(edge_text, st.sampled_from(["p" * 200, "p" * 201])),
    "compensate_limits": st.fixed_dictionaries(
        {}, optional={"timeout_s": edge_floats, "cpu_s": edge_ints, "memory_mb": edge_ints}
    ),
    "snapshot_paths": st.lists(
        st.sampled_from(["/tmp/a\n", "/tmp/./a", "/" + "a" * 4096]), max_size=2
    ),
}


@st.composite
def edge_specs(draw: st.DrawFn) -> dict[str, Any]:
    """A mostly valid spec with a field or two at (or just past) its limits."""
    data = dict(draw(valid_ish_specs))
    for name in draw(st.lists(st.sampled_from(sorted(EDGES)), min_size=1, max_size=2)):
        data[name] = draw(EDGES[name])
    if "compensate_limits" in data:
        data.setdefault("compensate", ["/bin/true"])
    return data


def build(data: dict[str, Any]) -> CommandSpec | None:
    """The spec, or None for a SpecError; any other exception fails the test."""
    try:
        return CommandSpec(**data)
    except SpecError as exc:
        assert str(exc), "a refusal must say why"
        return None


def _storable(value: Any) -> None:
    """What a valid spec holds fits the store: UTF-8 text without NUL, 32-bit ints, finite."""
    if isinstance(value, str):
        value.encode()
        assert "\x00" not in value
    elif isinstance(value, bool) or value is None:
        pass
    elif isinstance(value, int):
        assert -(2**31) <= value < 2**31
    elif isinstance(value, float):
        assert value == value and abs(value) != float("inf")
    elif isinstance(value, dict):
        for k, v in value.items():
            _storable(k)
            _storable(v)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _storable(item)
    else:
        raise AssertionError(f"unexpected {type(value).__name__} in a valid spec")


# --- CommandSpec ----------------------------------------------------------------------------


@FUZZ
@given(data=st.one_of(raw_specs, valid_ish_specs, one_bad_field(), edge_specs()))
def test_any_input_is_a_valid_spec_or_a_spec_error(data: dict[str, Any]) -> None:
    s = build(data)
    if s is None:
        return
    assert s.argv and s.argv[0].startswith("/")
    _storable(s.model_dump())
    # What is accepted has the documented shape all the way to the end (no trailing "\n").
    assert re.fullmatch(r"[a-z][a-z0-9_-]{0,39}", s.tenant)
    assert s.idempotency_key is None or re.fullmatch(r"[\x21-\x7e]{1,200}", s.idempotency_key)
    for name in (*s.env, *s.secrets):
        assert re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,127}", name)
    # repr and str name the secrets but never depend on their values.
    blank = s.model_copy(update={"secrets": dict.fromkeys(s.secrets, "")})
    assert repr(s) == repr(blank) and str(s) == str(blank)


@FUZZ
@given(data=st.one_of(valid_ish_specs, edge_specs()))
def test_a_valid_spec_round_trips_to_the_same_canonical_form_and_hash(
    data: dict[str, Any],
) -> None:
    s = build(data)
    if s is None:
        return
    canonical = s.canonical()
    assert canonical == s.canonical()
    # Strict JSON (no NaN/Infinity): what the hash is taken over and what a store keeps.
    blob = json.dumps(canonical, sort_keys=True, allow_nan=False)
    assert json.loads(blob) == canonical
    digest = s.spec_hash()
    assert re.fullmatch(r"[0-9a-f]{64}", digest) and digest == s.spec_hash()
    again = CommandSpec(**s.model_dump())
    assert again == s
    assert again.canonical() == canonical and again.spec_hash() == digest
    # Secret values never enter the hash; their names do.
    if s.secrets:
        other = s.model_copy(update={"secrets": {k: v + "x" for k, v in s.secrets.items()}})
        assert other.spec_hash() == digest
    assert cmd_hash(s.argv) == cmd_hash(list(s.argv))


# --- policy -----------------------------------------------------------------------------------


@FUZZ_WITH_FIXTURE
@given(data=valid_ish_specs)
def test_policy_check_returns_the_tenant_or_refuses(
    tenants: TenantsFile, data: dict[str, Any]
) -> None:
    s = build(data)
    if s is None:
        return
    try:
        tenant = policy.check(s, tenants)
    except UnknownTenant as exc:
        assert s.tenant not in tenants.tenants and repr(s.tenant) in str(exc)
        return
    except PolicyDenied as exc:
        assert exc.rule.split(":")[0].split(".")[0] in {
            "executables",
            "deny_args",
            "deny_executable",
            "limits",
            "max_retries",
            "snapshot_roots",
            "env_allow",
            "deny_options",
            "raw_argv",
        }, exc.rule
        assert str(exc)
        return
    # Allowed: then it really is within the tenant's policy.
    assert tenant.name == s.tenant
    assert policy.allowed(s.argv[0], tenant)
    assert policy.denied("argv", s.argv, tenant) is None
    for asked, ceiling in (
        (s.timeout_s, tenant.limits.timeout_s),
        (s.cpu_s, tenant.limits.cpu_s),
        (s.memory_mb, tenant.limits.memory_mb),
    ):
        assert asked is None or asked <= ceiling
    assert s.max_retries <= tenant.max_retries


# Valid regexes without nested repetition, so a search stays quick on any argument.
patterns = st.one_of(
    st.sampled_from(["^-rf$", "--force", "\\.\\.", "^/etc/", "(a|b)+c", "\\s", "\\x00", "", "^$"]),
    st.text(st.characters(codec="ascii"), max_size=6).filter(
        lambda p: _compiles(p) and "*" not in p and "+" not in p and "{" not in p
    ),
)


def _compiles(pattern: str) -> bool:
    try:
        re.compile(pattern)
    except re.error:
        return False
    return True


def _is_spec_argv0(path: str) -> bool:
    """What a valid spec's argv[0] can be: the policy only ever sees those."""
    try:
        CommandSpec(tenant="alpha", argv=[path])
    except SpecError:
        return False
    return True


deny_entries = st.one_of(
    patterns,
    st.fixed_dictionaries(
        {"executable": st.sampled_from(["/bin/echo", "/usr/bin/echo", "/bin/sh", "/nonexistent"])},
        optional={"pattern": st.one_of(st.none(), patterns)},
    ),
)


tenant_policies = st.fixed_dictionaries(
    {
        "executables": st.lists(
            st.sampled_from(["/bin/echo", "/usr/bin/env", "/bin/sh"]), min_size=1
        )
    },
    optional={
        "snapshot_roots": st.lists(
            st.sampled_from(["/tmp", "/tmp/../etc", "/nonexistent", "/var/"])
        ),
        "env_allow": st.one_of(st.none(), st.lists(st.sampled_from(["LANG", "A", "COLOR"]))),
        "deny_options": st.dictionaries(
            st.sampled_from(["/bin/echo", "/usr/bin/env"]),
            st.lists(st.sampled_from(["-n", "--help", "-e", "-exec"]), min_size=1),
            max_size=2,
        ),
        "max_retries": st.integers(0, 20),
        "limits": st.fixed_dictionaries(
            {},
            optional={
                "timeout_s": st.floats(min_value=0.001, max_value=86_400),
                "cpu_s": st.integers(1, 86_400),
                "memory_mb": st.integers(8, 1_048_576),
            },
        ),
    },
)


@FUZZ
@given(data=st.one_of(valid_ish_specs, one_bad_field()), tenant=tenant_policies, deny=st.data())
def test_policy_never_crashes_whatever_the_tenant_allows(
    data: dict[str, Any], tenant: dict[str, Any], deny: st.DataObject
) -> None:
    tenant = {**tenant, "deny_args": deny.draw(st.lists(deny_entries, max_size=3))}
    tenants = TenantsFile.model_validate({"tenants": {"alpha": tenant}})
    s = build({**data, "tenant": "alpha"})
    if s is None:
        return
    with contextlib.suppress(PolicyDenied, UnknownTenant):
        assert policy.check(s, tenants).name == "alpha"


@FUZZ_WITH_FIXTURE
@given(
    deny=st.lists(deny_entries, max_size=4),
    argv0=paths.filter(_is_spec_argv0),
    args=st.lists(any_text, max_size=6),
)
def test_deny_args_never_crash(
    tenants: TenantsFile, deny: list[Any], argv0: str, args: list[str]
) -> None:
    argv = (argv0, *args)
    fuzzed = Tenant.model_validate({"name": "fuzz", "executables": [argv0], "deny_args": deny})
    for tenant in (*tenants.tenants.values(), fuzzed):
        denial = policy.denied("argv", argv, tenant)
        if denial is None:
            plain = [e for e in tenant.deny_args if isinstance(e, str)]
            assert not any(re.search(p, a) for p in plain for a in args)
        else:
            assert denial.rule.startswith(("deny_args:", "deny_executable:")) and denial.message
        if hasattr(tenant, "denied_by"):  # the older per-tenant API, where it still exists
            found = tenant.denied_by(argv)
            assert found is None or found in tenant.deny_args


# --- a message's body ------------------------------------------------------------------------

command_ids = st.one_of(
    st.uuids().map(str), st.uuids().map(str), st.uuids().map(lambda u: str(u).upper()), values
)
secret_maps = st.one_of(
    st.dictionaries(env_names, st.one_of(clean_text, clean_text, any_text, values), max_size=3),
    values,
)
message_fields = {
    "command_id": command_ids,
    "tenant": st.one_of(tenant_names, values),
    "sealed": values,
}
SEALER = Sealer(b"fuzz-master-key-" * 2)


def _text(value: object) -> bool:
    """Text a producer could seal (a validated spec holds nothing else)."""
    return isinstance(value, str) and valid_text(value)


@st.composite
def messages(draw: st.DrawFn) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    kwargs = draw(
        st.one_of(
            st.fixed_dictionaries(message_fields),  # what a producer sends, values aside
            st.fixed_dictionaries(
                {}, optional={**message_fields, "secrets": secret_maps, "extra": values}
            ),
        )
    )
    cid, tenant = kwargs.get("command_id"), kwargs.get("tenant")
    if draw(st.booleans()) and isinstance(cid, str) and isinstance(tenant, str):
        # Sealed as a producer seals (values of any shape), sometimes for another command.
        sealed_for = draw(st.one_of(st.just(cid), st.uuids().map(str)))
        plain = draw(secret_maps)
        if isinstance(plain, dict) and _text(tenant) and all(map(_text, plain.values())):
            kwargs["sealed"] = SEALER.seal(sealed_for, tenant, plain)
    same = st.just(kwargs.get("command_id"))
    task_id = draw(st.one_of(same, same, same, st.uuids().map(str), st.none(), values))
    headers = draw(
        st.dictionaries(
            st.one_of(st.sampled_from(["traceparent", "tracestate"]), any_text), values, max_size=3
        )
    )
    return task_id, kwargs, headers


@FUZZ
@given(message=messages())
def test_decode_returns_a_delivery_or_refuses_with_bad_message(
    message: tuple[Any, dict[str, Any], dict[str, Any]],
) -> None:
    task_id, kwargs, headers = message
    try:
        delivery = decode(task_id, kwargs, headers, SEALER)
    except BadMessage as exc:
        assert str(exc)
        return
    assert isinstance(delivery, Delivery)
    assert delivery.command_id == task_id and isinstance(delivery.command_id, str)
    assert uuid.UUID(delivery.command_id[:36])
    assert isinstance(delivery.tenant, str)
    assert set(kwargs) <= {"command_id", "tenant", "sealed"}  # clear text never passes
    for name, value in delivery.secrets.items():
        assert isinstance(name, str) and isinstance(value, str)
        assert "\x00" not in value
        value.encode()
    assert delivery.traceparent is None or isinstance(delivery.traceparent, str)
    assert delivery.tracestate is None or isinstance(delivery.tracestate, str)
