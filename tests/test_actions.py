"""Actions: typed command templates, their parameters, and how they are recorded and run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from producer import actions, policy
from producer.action_model import Action, Placeholder, parse_template
from producer.client import Producer
from producer.errors import PolicyDenied, SpecError
from producer.settings import ConfigInvalid
from producer.spec import CommandSpec
from producer.states import State
from producer.tenants import TenantsFile, load_tenants
from tests.conftest import TENANTS_YAML, Env, WorkerProc

ROOT = Path(__file__).resolve().parent.parent
Start = Callable[..., WorkerProc]

FILE = """
tenants:
  acme:
    env_allow: [LANG, TZ]
    executables: [/bin/echo, /bin/rm, /bin/ls, /bin/mkdir]
    deny_options:
      /bin/rm: ["--recursive", "-r", "-R"]
    actions:
      clean-dir:
        argv: ["/bin/rm", "-r", "--", "{path}"]
        params:
          path: {type: path, under: ["ROOT"]}
      list:
        argv: ["/bin/ls", "--", "{path}"]
        params:
          path: {type: path, under: ["ROOT"]}
      greet:
        argv: ["/bin/echo", "hello {name}", "{count}", "--loud={loud}"]
        params:
          name: {type: string, pattern: "^[a-z ]{1,20}$"}
          count: {type: integer, minimum: 1, maximum: 5}
          loud: {type: boolean, default: false}
      echo:
        argv: ["/bin/echo", "{text}", "{n}"]
        params:
          text: {type: string, max_length: 40}
          n: {type: integer, allow_dash: true}
        env_allow: [COLOR]
        limits: {timeout_s: 5}
      login:
        argv: ["/bin/echo", "as {user}"]
        env: {TOKEN: "{token}", WHO: "{user}"}
        params:
          user: {type: string, enum: [app, web]}
          token: {type: string, secret: true}
"""


@pytest.fixture
def scratch(tmp_path: Path) -> Path:
    root = tmp_path / "scratch"
    (root / "a").mkdir(parents=True)
    return root


@pytest.fixture
def acme(tmp_path: Path, scratch: Path) -> TenantsFile:
    path = tmp_path / "acme.yaml"
    path.write_text(FILE.replace("ROOT", str(scratch)))
    return load_tenants(path, env="dev")


def resolved(tenants: TenantsFile, action: str, **params: str | int | bool) -> CommandSpec:
    spec = CommandSpec(tenant="acme", action=action, params=params)
    filled = actions.resolve(spec, tenants.tenants["acme"])
    return filled


def rule_of(tenants: TenantsFile, action: str, **params: str | int | bool) -> str | None:
    try:
        policy.check(resolved(tenants, action, **params), tenants)
    except PolicyDenied as exc:
        return exc.rule
    return None


# --- the template filler --------------------------------------------------------------------


def test_a_placeholder_fills_part_of_one_element_and_types_become_text(
    acme: TenantsFile,
) -> None:
    spec = resolved(acme, "greet", name="bob", count=2, loud=True)
    assert spec.argv == ("/bin/echo", "hello bob", "2", "--loud=true")
    assert spec.action == "greet" and spec.params == {"name": "bob", "count": 2, "loud": True}
    # The default fills a parameter left out, and is recorded as used.
    assert resolved(acme, "greet", name="bob", count=1).params["loud"] is False


def test_doubled_braces_are_literal_and_lone_braces_are_refused() -> None:
    assert parse_template("{{x}} {y}") == ("{x} ", Placeholder("y"))
    for bad in ("{", "}", "{x", "a}b", "{Bad}", "{x y}"):
        with pytest.raises(ValueError):
            parse_template(bad)


@pytest.mark.parametrize(
    ("params", "rule"),
    [
        ({"name": "bob"}, "param:count:missing"),
        ({"name": "bob", "count": 1, "extra": "x"}, "param:extra:unknown"),
        ({"name": "Bob", "count": 1}, "param:name:pattern"),
        ({"name": "bob", "count": "1"}, "param:count:type"),
        ({"name": "bob", "count": True}, "param:count:type"),
        ({"name": "bob", "count": 0}, "param:count:minimum"),
        ({"name": "bob", "count": 6}, "param:count:maximum"),
        ({"name": "bob", "count": 1, "loud": "yes"}, "param:loud:type"),
        ({"name": 7, "count": 1}, "param:name:type"),
    ],
)
def test_a_bad_parameter_is_refused_naming_it_and_its_rule(
    acme: TenantsFile, params: dict[str, str | int | bool], rule: str
) -> None:
    with pytest.raises(PolicyDenied) as caught:
        resolved(acme, "greet", **params)
    assert caught.value.rule == rule
    assert params and next(iter(rule.split(":")[1:2])) in str(caught.value)


def test_a_value_beginning_with_a_dash_is_refused_unless_allowed(acme: TenantsFile) -> None:
    with pytest.raises(PolicyDenied) as caught:
        resolved(acme, "echo", text="--help", n=1)
    assert caught.value.rule == "param:text:dash"
    # `n` says allow_dash: a negative number is fine there.
    assert resolved(acme, "echo", text="x", n=-3).argv == ("/bin/echo", "x", "-3")


def test_a_path_must_resolve_strictly_below_its_root(
    acme: TenantsFile, scratch: Path, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (scratch / "link").symlink_to(outside)
    assert resolved(acme, "list", path=f"{scratch}/a").argv[-1] == f"{scratch}/a"
    for path in (
        str(scratch),  # the root itself
        f"{scratch}/../outside",  # climbs out
        f"{scratch}/link",  # a symlink leading out
        f"{scratch}/link/x",
        "/etc/passwd",
        "relative/a",
    ):
        with pytest.raises(PolicyDenied) as caught:
            resolved(acme, "list", path=path)
        assert caught.value.rule in {"param:path:under", "param:path:absolute"}, path


def test_the_resolved_argv_meets_every_raw_rule(acme: TenantsFile, scratch: Path) -> None:
    # clean-dir's own template spells `rm -r`, which the tenant's deny_options refuse: the
    # filled argv is judged like a raw one (and `execq config check` warns about it).
    assert rule_of(acme, "clean-dir", path=f"{scratch}/a") == "deny_options:-r"


def test_a_secret_parameter_goes_to_the_childs_env_only_and_is_never_recorded(
    acme: TenantsFile,
) -> None:
    spec = resolved(acme, "login", user="app", token="s3cr3t-value")
    assert spec.secrets == {"TOKEN": "s3cr3t-value"} and spec.env == {"WHO": "app"}
    assert spec.params == {"user": "app"}
    assert "s3cr3t-value" not in json.dumps(spec.canonical())
    # A caller cannot change what the action sets.
    with pytest.raises(PolicyDenied) as caught:
        actions.resolve(
            CommandSpec(
                tenant="acme",
                action="login",
                params={"user": "app", "token": "x"},
                env={"WHO": "root"},
            ),
            acme.tenants["acme"],
        )
    assert caught.value.rule == "env_allow"


def test_env_is_limited_by_the_tenants_or_the_actions_allow_list(acme: TenantsFile) -> None:
    def env_rule(env: dict[str, str], **spec: object) -> str | None:
        try:
            given = CommandSpec(tenant="acme", env=env, **spec)  # type: ignore[arg-type]
            policy.check(actions.resolve(given, acme.tenants["acme"]), acme)
        except PolicyDenied as exc:
            return exc.rule
        return None

    assert env_rule({"LANG": "C"}, argv=["/bin/echo"]) is None
    assert env_rule({"COLOR": "1"}, argv=["/bin/echo"]) == "env_allow"
    echo = {"action": "echo", "params": {"text": "x", "n": 1}}
    assert env_rule({"COLOR": "1"}, **echo) is None
    assert env_rule({"LANG": "C"}, **echo) == "env_allow"  # the action's list replaces it


def test_an_action_asking_above_its_ceiling_is_refused_and_its_ceiling_is_the_default(
    acme: TenantsFile,
) -> None:
    assert resolved(acme, "echo", text="x", n=1).timeout_s == 5
    with pytest.raises(PolicyDenied) as caught:
        actions.resolve(
            CommandSpec(tenant="acme", action="echo", params={"text": "x", "n": 1}, timeout_s=9),
            acme.tenants["acme"],
        )
    assert caught.value.rule == "limits.timeout_s"


def test_a_spec_gives_an_argv_or_an_action_never_both() -> None:
    with pytest.raises(SpecError, match="not both"):
        CommandSpec(tenant="acme", argv=["/bin/echo"], action="greet")
    with pytest.raises(SpecError, match="argv must not be empty"):
        CommandSpec(tenant="acme")
    with pytest.raises(SpecError, match="params go with an action"):
        CommandSpec(tenant="acme", argv=["/bin/echo"], params={"a": 1})
    with pytest.raises(SpecError, match="come from the tenants file"):
        CommandSpec(tenant="acme", action="greet", compensate=["/bin/true"])


# Any string, including ones full of spaces, quotes, dashes and shell syntax.
values = st.text(st.characters(blacklist_characters="\x00", codec="utf-8"), max_size=30)


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(text=values, n=st.integers(-(10**6), 10**6))
def test_no_value_ever_adds_an_argument_or_an_option(acme: TenantsFile, text: str, n: int) -> None:
    try:
        spec = resolved(acme, "echo", text=text, n=n)
    except PolicyDenied as exc:
        assert exc.rule.startswith("param:text:")
        assert text.startswith("-") or len(text) > 40
        return
    assert spec.argv == ("/bin/echo", text, str(n))
    assert not spec.argv[1].startswith("-")


@settings(max_examples=200, deadline=None)
@given(
    parts=st.lists(
        st.one_of(
            st.text(st.sampled_from("ab -=/ '\"$;|"), max_size=5),
            st.sampled_from(["{p}", "{q}"]),
        ),
        min_size=1,
        max_size=6,
    ),
    p=values,
    q=values,
)
def test_a_template_element_always_fills_into_exactly_one_element(
    parts: list[str], p: str, q: str
) -> None:
    element = "".join(x.replace("{", "{{").replace("}", "}}") if x[:1] != "{" else x for x in parts)
    filled = actions.fill(("/bin/echo", element, "tail"), {"p": p, "q": q})
    assert len(filled) == 3 and filled[0] == "/bin/echo" and filled[2] == "tail"
    expected = "".join({"{p}": p, "{q}": q}.get(x, x) for x in parts)
    assert filled[1] == expected


# --- the tenants file --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("action", "message"),
    [
        ("{argv: ['{prog}', x], params: {prog: {type: string}}}", "must be a literal path"),
        ("{argv: [/usr/bin/awk, x]}", "is not on the tenant's executables"),
        ("{argv: [/bin/echo, '{nope}']}", "name no parameter"),
        ("{argv: [/bin/echo, 'a{x']}", "a lone '{'"),
        (
            "{argv: [/bin/echo, '{t}'], params: {t: {type: string, secret: true}}}",
            "may be used only in env",
        ),
        ("{argv: [/bin/echo, '{p}'], params: {p: {type: path}}}", "needs `under`"),
        ("{argv: [/bin/echo, '{p}'], params: {p: {type: integer, pattern: x}}}", "pattern"),
        ("{argv: [/bin/echo], limits: {timeout_s: 999}}", "above the tenant's ceiling"),
    ],
)
def test_a_bad_action_stops_the_load_naming_the_action_and_the_problem(
    tmp_path: Path, action: str, message: str
) -> None:
    path = tmp_path / "t.yaml"
    path.write_text(
        "tenants:\n  acme:\n    executables: [/bin/echo]\n"
        f"    limits: {{timeout_s: 30}}\n    actions:\n      broken: {action}\n"
    )
    with pytest.raises(ConfigInvalid) as caught:
        load_tenants(path, env="dev")
    assert "broken" in str(caught.value) and message in str(caught.value)


def test_params_are_published_as_json_schema(acme: TenantsFile) -> None:
    schema = acme.tenants["acme"].actions["greet"].params_schema()
    assert schema["required"] == ["name", "count"] and schema["additionalProperties"] is False
    assert schema["properties"]["count"] == {"type": "integer", "minimum": 1, "maximum": 5}
    assert schema["properties"]["loud"] == {"type": "boolean", "default": False}
    login = acme.tenants["acme"].actions["login"].params_schema()
    assert login["properties"]["token"]["writeOnly"] is True


def test_the_action_model_refuses_unknown_fields() -> None:
    with pytest.raises(ValueError, match="argvv"):
        Action.model_validate({"argv": ["/bin/echo"], "argvv": []})


# --- through the producer and the store -----------------------------------------------------


def test_an_action_is_recorded_with_its_params_and_resolved_argv(producer: Producer) -> None:
    r = producer.submit(
        CommandSpec(tenant="alpha", action="greet", params={"name": "bob"}, idempotency_key="k1")
    )
    rec = producer.get(r.id)
    assert rec.action == "greet" and rec.params == {"name": "bob", "count": 1}
    assert rec.argv == ["/bin/echo", "hello bob", "1"]
    parse = next(e for e in producer.audit_events(command_id=r.id) if e.phase == "parse")
    assert parse.detail["action"] == "greet"
    # The same action and params under the key: a duplicate; other params: a conflict.
    again = producer.submit(
        CommandSpec(tenant="alpha", action="greet", params={"name": "bob"}, idempotency_key="k1")
    )
    assert again.duplicate and again.id == r.id
    with pytest.raises(Exception, match="different spec"):
        producer.submit(
            CommandSpec(
                tenant="alpha", action="greet", params={"name": "eve"}, idempotency_key="k1"
            )
        )


def test_a_refused_action_is_recorded_rejected_and_audited(producer: Producer) -> None:
    with pytest.raises(PolicyDenied) as caught:
        producer.submit(
            CommandSpec(tenant="alpha", action="greet", params={"name": "bob", "count": 9})
        )
    assert caught.value.rule == "param:count:maximum"
    rec = producer.get(caught.value.command_id or "")
    assert rec.state is State.REJECTED and rec.failure_reason == "policy:param:count:maximum"
    assert rec.action == "greet" and rec.argv == []
    phases = [(e.phase, e.outcome) for e in producer.audit_events(command_id=rec.id)]
    assert phases == [("parse", "ok"), ("authz", "refused"), ("abort", "refused")]
    # An unknown action is refused the same way, and keeps none of its parameters.
    with pytest.raises(PolicyDenied) as unknown:
        producer.submit(
            CommandSpec(tenant="alpha", action="nope", params={"token": "maybe-secret"})
        )
    assert unknown.value.rule == "action"
    assert producer.get(unknown.value.command_id or "").params == {}


def test_a_refused_action_never_records_its_secret_parameter(producer: Producer) -> None:
    with pytest.raises(PolicyDenied) as caught:
        producer.submit(
            CommandSpec(
                tenant="alpha",
                action="show-token",
                params={"name": "x" * 11, "token": "hunter2-secret"},
            )
        )
    rec = producer.get(caught.value.command_id or "")
    assert "hunter2" not in json.dumps(rec.to_json(), default=str)
    assert rec.params == {"name": "x" * 11}


def test_a_tenant_with_raw_argv_off_runs_only_actions(
    tmp_path: Path, make_env: Callable[..., Env], redis_url: str
) -> None:
    path = tmp_path / "only-actions.yaml"
    path.write_text(TENANTS_YAML.replace("  beta:\n", "  beta:\n    raw_argv: false\n"))
    env = make_env(f"sqlite:///{tmp_path}/s.db", redis_url)
    from producer.store.db import make_engine
    from producer.store.migrate import upgrade

    upgrade(make_engine(env.settings.database_url))
    with Producer.from_settings(env.settings, load_tenants(path)) as producer:
        with pytest.raises(PolicyDenied) as caught:
            producer.submit(CommandSpec(tenant="beta", argv=["/bin/echo", "hi"]))
        assert caught.value.rule == "raw_argv"
        assert producer.get(caught.value.command_id or "").state is State.REJECTED


def test_an_action_runs_in_a_worker_with_its_secret_in_the_env_only(
    producer: Producer, workers: Start
) -> None:
    workers("alpha")
    r = producer.submit(
        CommandSpec(
            tenant="alpha", action="show-token", params={"name": "ann", "token": "tok-4242-xyz"}
        )
    )
    rec = producer.wait(r.id, timeout=30)
    assert rec.state is State.SUCCEEDED, rec.error
    # The child saw both; the store shows the secret scrubbed and never keeps the parameter.
    assert (rec.stdout or "").startswith("hi ann:") and "tok-4242-xyz" not in (rec.stdout or "")
    assert rec.params == {"name": "ann"} and rec.secret_names == ["TOKEN"]


def test_a_worker_refuses_an_action_its_policy_no_longer_has(
    producer: Producer, workers: Start, env: Env, tmp_path: Path
) -> None:
    without = tmp_path / "without-greet.yaml"
    without.write_text(TENANTS_YAML.replace("      greet:", "      greeting:"))
    workers("alpha", extra_env={"EXECQ_TENANTS_FILE": str(without)})
    r = producer.submit(CommandSpec(tenant="alpha", action="greet", params={"name": "bob"}))
    rec = producer.wait(r.id, timeout=30)
    assert rec.state is State.FAILED and rec.failure_reason == "policy:action"
    assert rec.exit_code is None


# --- the command line -------------------------------------------------------------------


def _cli(env: Env, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "workers.cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **env.vars},
        cwd=ROOT,
        check=False,
        timeout=60,
    )


def test_the_cli_lists_actions_and_submits_one_with_typed_params(env: Env) -> None:
    listed = _cli(env, "actions", "--tenant", "alpha", "--json")
    assert listed.returncode == 0, listed.stderr
    by_name = {a["name"]: a for a in json.loads(listed.stdout)}
    assert by_name["greet"]["params"]["properties"]["count"]["type"] == "integer"
    done = _cli(
        env, "submit", "--tenant", "alpha", "--action", "greet", "--param", "name=bob",
        "--param", "count=3", "--json",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    made = json.loads(done.stdout)
    status = json.loads(_cli(env, "status", made["id"], "--json").stdout)
    assert status["argv"] == ["/bin/echo", "hello bob", "3"] and status["action"] == "greet"
    bad = _cli(env, "submit", "--tenant", "alpha", "--action", "greet", "--param", "count=x")
    assert bad.returncode == 2 and "count is an integer" in bad.stderr
    refused = _cli(
        env, "submit", "--tenant", "alpha", "--action", "greet", "--param", "name=BOB", "--json"
    )
    assert refused.returncode == 1
    answer = json.loads(refused.stdout)
    assert answer["rule"] == "param:name:pattern" and answer["state"] == "rejected"
