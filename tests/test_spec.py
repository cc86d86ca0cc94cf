"""CommandSpec refuses malformed input with a SpecError that names the field."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from producer.errors import ExecqError, SpecError
from producer.spec import MAX_ARG_BYTES, MAX_ARGS, CommandSpec


def spec(**kw: object) -> CommandSpec:
    base: dict[str, object] = {"tenant": "alpha", "argv": ["/bin/echo", "hi"]}
    base.update(kw)
    return CommandSpec(**base)  # type: ignore[arg-type]


def test_a_valid_spec_is_frozen_and_lists_become_tuples() -> None:
    s = spec(env={"LANG": "C.UTF-8"})
    assert s.argv == ("/bin/echo", "hi")
    with pytest.raises(ValueError, match="frozen"):
        s.tenant = "beta"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"argv": []}, "argv must not be empty"),
        ({"argv": ["echo", "hi"]}, "absolute path"),
        ({"argv": ["/bin/echo", 3]}, "argv.1"),
        ({"argv": "/bin/echo hi"}, "argv"),
        ({"argv": ["/bin/echo", "a\x00b"]}, "NUL"),
        ({"argv": ["/bin/echo", "x" * (MAX_ARG_BYTES + 1)]}, "bytes"),
        ({"argv": ["/bin/echo"] * (MAX_ARGS + 1)}, "arguments"),
        ({"env": {"BAD NAME": "x"}}, "not a valid variable name"),
        ({"env": {"A=B": "x"}}, "not a valid variable name"),
        ({"env": {"X\nY": "x"}}, "not a valid variable name"),
        ({"env": {"LD_PRELOAD": "/tmp/x.so"}}, "changes which code runs"),
        ({"env": {"PATH": "/tmp"}}, "execq sets it"),
        ({"env": {"A": "x\x00"}}, "NUL"),
        ({"secrets": {"TOKEN": "s"}, "env": {"TOKEN": "e"}}, "both as env and as secrets"),
        ({"timeout_s": 0}, "timeout_s"),
        ({"timeout_s": -5.0}, "timeout_s"),
        ({"idempotency_key": "has space"}, "idempotency_key"),
        ({"idempotency_key": "k" * 201}, "idempotency_key"),
        ({"tenant": "Not A Tenant"}, "tenant"),
        ({"rollback_on_failure": True}, "needs a compensate"),
        ({"compensate": []}, "compensate must not be empty"),
        ({"unknown_field": 1}, "unknown_field"),
    ],
)
def test_malformed_specs_raise_spec_error_naming_the_problem(
    fields: dict[str, object], needle: str
) -> None:
    with pytest.raises(SpecError) as info:
        spec(**fields)
    assert needle in str(info.value)
    assert isinstance(info.value, ExecqError) and isinstance(info.value, ValueError)


def test_secret_values_never_appear_in_repr_or_errors() -> None:
    s = spec(secrets={"API_TOKEN": "canary-s3cr3t"})
    assert "canary-s3cr3t" not in repr(s) and "canary-s3cr3t" not in str(s)
    with pytest.raises(SpecError) as info:
        spec(secrets={"API_TOKEN": "canary-s3cr3t\x00"})
    assert "canary-s3cr3t" not in str(info.value)


def test_the_spec_hash_ignores_secret_values_but_not_the_command() -> None:
    a = spec(secrets={"T": "one"})
    b = spec(secrets={"T": "two"})
    c = spec(argv=["/bin/echo", "other"], secrets={"T": "one"})
    assert a.spec_hash() == b.spec_hash()
    assert a.spec_hash() != c.spec_hash()
    assert a.spec_hash() != spec().spec_hash()  # the secret's name is part of the command


@settings(max_examples=300, deadline=None)
@given(
    argv=st.lists(st.text(max_size=40), max_size=6),
    env=st.dictionaries(st.text(max_size=12), st.text(max_size=20), max_size=4),
    key=st.one_of(st.none(), st.text(max_size=30)),
    timeout=st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True)),
)
def test_no_input_crashes_the_spec(
    argv: list[str], env: dict[str, str], key: str | None, timeout: float | None
) -> None:
    try:
        s = CommandSpec(tenant="alpha", argv=argv, env=env, idempotency_key=key, timeout_s=timeout)
    except SpecError:
        return
    assert s.argv[0].startswith("/")
    assert all("\x00" not in a for a in s.argv)
