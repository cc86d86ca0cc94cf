"""A hostile-input corpus: every case is refused clearly (type + message), and nothing runs.

Three layers refuse: the spec (SpecError naming the field), the tenant policy (PolicyDenied
naming the rule) and the worker's sandbox (ExecutableRefused naming the path and why).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from producer import policy
from producer.client import Producer
from producer.dangerous import lookup
from producer.errors import ExecutableRefused, PolicyDenied, SandboxError, SpecError
from producer.spec import (
    MAX_ARG_BYTES,
    MAX_ARGS,
    MAX_ARGV_BYTES,
    MAX_ENV_BYTES,
    MAX_ENV_VALUE_BYTES,
    MAX_ENV_VARS,
    MAX_LIMIT_INT,
    CommandSpec,
)
from producer.states import State
from producer.tenants import TenantsFile, load_tenants
from tests.conftest import WorkerProc
from workers.sandbox import ExecRequest, Limits, Sandbox, resolve_executable

ROOT = Path(__file__).resolve().parent.parent
ECHO = os.path.realpath("/bin/echo")
SH = os.path.realpath("/bin/sh")
# One tenant that may run /bin/echo and nothing else.
ECHO_ONLY = TenantsFile.model_validate({"tenants": {"gamma": {"executables": ["/bin/echo"]}}})
LIMITS = Limits(
    timeout_s=10, cpu_s=10, memory_mb=256, processes=64, output_kb=64, file_mb=16, open_files=256
)
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="chown to another uid needs root")


# --- helpers ------------------------------------------------------------------------------


def spec(**kw: object) -> CommandSpec:
    base: dict[str, object] = {"tenant": "alpha", "argv": ["/bin/echo", "hi"]}
    base.update(kw)
    return CommandSpec(**base)  # type: ignore[arg-type]


def spec_refused(**kw: object) -> str:
    with pytest.raises(SpecError) as info:
        spec(**kw)
    return str(info.value)


def policy_refused(argv0: str) -> PolicyDenied:
    with pytest.raises(PolicyDenied) as info:
        policy.check(CommandSpec(tenant="gamma", argv=[argv0, "x"]), ECHO_ONLY)
    return info.value


def resolve_refused(argv0: str | Path, allowed: list[str] | None = None) -> str:
    with pytest.raises(ExecutableRefused) as info:
        resolve_executable(str(argv0), allowed if allowed is not None else ["/bin/echo"])
    return str(info.value)


def copy_of(source: str, path: Path, mode: int = 0o755) -> Path:
    shutil.copyfile(source, path)
    path.chmod(mode)
    return path


@pytest.fixture
def sandbox(tmp_path: Path) -> Iterator[Sandbox]:
    sb = Sandbox(workdir_root=tmp_path / "runs")
    yield sb
    sb.close()


# --- argv[0]: shell metacharacters, relative paths, traversal -----------------------------


@pytest.mark.parametrize(
    "argv0", ["$(id)", "`id`", "sh", "./echo", "bin/echo", "../bin/echo", "~/echo", "-c", " /bin/x"]
)
def test_an_argv0_that_is_not_an_absolute_path_is_refused_everywhere(argv0: str) -> None:
    message = spec_refused(argv=[argv0, "x"])
    assert "argv[0] must be an absolute path" in message and repr(argv0) in message
    assert "must be an absolute path (nothing is searched)" in resolve_refused(argv0, [argv0])


@pytest.mark.parametrize(
    "argv0",
    [
        "/bin/sh;id",
        "/bin/echo;id",
        "/bin/echo|id",
        "/bin/echo&&id",
        "/bin/echo $(id)",
        "/bin/echo\n/bin/sh",
        "/bin/echo`id`",
        "/bin/../bin/sh",
        "/usr/bin/../../bin/sh",
        "/bin/./sh",
        "//bin//sh",
    ],
)
def test_a_disguised_argv0_passes_the_spec_but_policy_and_sandbox_refuse_it(argv0: str) -> None:
    # Absolute, so the spec takes it; what it names is not the one allow-listed program.
    spec(argv=[argv0])
    denied = policy_refused(argv0)
    assert denied.rule == "executables" and repr(argv0) in str(denied)
    assert "executables allow-list" in str(denied)
    assert "not in the allow-list" in resolve_refused(argv0)


@pytest.mark.parametrize("argv0", ["/bin/../bin/sh", "/usr/bin/../../bin/sh", "/bin/./sh"])
def test_path_traversal_to_another_program_is_named_by_what_it_resolves_to(argv0: str) -> None:
    assert f"it resolves to {SH}, which is not in the allow-list" in resolve_refused(argv0)


def test_traversal_that_lands_on_the_allowed_program_is_that_program() -> None:
    # The control for the cases above: resolving is by realpath, not by spelling.
    assert resolve_executable("/usr/bin/../bin/echo", ["/bin/echo"]) == ECHO
    assert policy.check(CommandSpec(tenant="gamma", argv=["/usr/bin/../bin/echo"]), ECHO_ONLY)


# --- symlinks -------------------------------------------------------------------------------


def test_a_symlink_named_echo_pointing_at_sh_is_refused(tmp_path: Path, safe_dir: Path) -> None:
    for directory in (tmp_path, safe_dir):
        link = directory / "echo"
        link.symlink_to("/bin/sh")
        message = resolve_refused(link)
        assert f"refused {link}: it resolves to {SH}, which is not in the allow-list" in message
        assert policy_refused(str(link)).rule == "executables"


def test_a_chain_of_symlinks_ending_at_sh_is_refused(safe_dir: Path) -> None:
    (safe_dir / "two").symlink_to("/bin/sh")
    (safe_dir / "one").symlink_to(safe_dir / "two")
    assert f"resolves to {SH}" in resolve_refused(safe_dir / "one")


def test_a_symlink_loop_is_refused_even_when_allow_listed(safe_dir: Path) -> None:
    a, b = safe_dir / "a", safe_dir / "b"
    a.symlink_to(b)
    b.symlink_to(a)
    assert "not in the allow-list" in resolve_refused(a)
    assert "Too many levels of symbolic links" in resolve_refused(a, [str(a)])


def test_a_symlink_to_the_allowed_program_is_that_program(safe_dir: Path) -> None:
    link = safe_dir / "say"
    link.symlink_to("/bin/echo")
    assert resolve_executable(str(link), ["/bin/echo"]) == ECHO
    assert policy.check(CommandSpec(tenant="gamma", argv=[str(link)]), ECHO_ONLY).name == "gamma"


def test_a_symlink_to_the_allowed_program_under_tmp_is_refused_as_tamperable(
    tmp_path: Path,
) -> None:
    # Stricter than "resolves to it": /tmp is world-writable, so the link could be re-pointed.
    link = tmp_path / "say"
    link.symlink_to("/bin/echo")
    assert "is world-writable" in resolve_refused(link)


def test_a_symlink_re_pointed_after_the_policy_check_is_caught_by_the_sandbox(
    safe_dir: Path,
) -> None:
    link = safe_dir / "run"
    link.symlink_to("/bin/echo")
    s = CommandSpec(tenant="gamma", argv=[str(link)])
    policy.check(s, ECHO_ONLY)
    link.unlink()
    link.symlink_to("/bin/sh")
    # policy.check may answer from its realpath cache; the sandbox resolves afresh.
    assert f"resolves to {SH}" in resolve_refused(link)


# --- an allow-listed executable swapped, or writable by others ----------------------------


def _swap_content(tool: Path) -> None:
    swapped = copy_of("/bin/sh", tool.with_name("tool.new"))
    swapped.replace(tool)  # a new inode at the same path (what `install` or an upgrade does)


def _swap_for_symlink(tool: Path) -> None:
    tool.unlink()
    tool.symlink_to("/bin/sh")


@pytest.mark.parametrize("swap", [_swap_content, _swap_for_symlink], ids=["content", "symlink"])
def test_an_allow_listed_file_replaced_after_the_worker_pinned_it_is_refused(
    safe_dir: Path, swap: Callable[[Path], None]
) -> None:
    tool = copy_of("/bin/true", safe_dir / "tool")
    assert resolve_executable(str(tool), [str(tool)]) == str(tool)
    swap(tool)
    with pytest.raises(ExecutableRefused, match=r"since this worker started|now resolves to"):
        resolve_executable(str(tool), [str(tool)])


def test_a_world_writable_executable_is_refused(tmp_path: Path, safe_dir: Path) -> None:
    for directory in (tmp_path, safe_dir):
        tool = copy_of("/bin/true", directory / "tool", 0o777)
        assert f"refused {tool}: file {tool} is world-writable" in resolve_refused(
            tool, [str(tool)]
        )


def test_a_group_writable_executable_is_refused(safe_dir: Path) -> None:
    tool = copy_of("/bin/true", safe_dir / "tool", 0o775)
    assert f"file {tool} is group-writable" in resolve_refused(tool, [str(tool)])


@pytest.mark.parametrize("mode", [0o777, 0o1777, 0o775])
def test_an_executable_in_a_writable_directory_is_refused(safe_dir: Path, mode: int) -> None:
    # Even with the sticky bit: stricter than needed, and /tmp-like places are never safe.
    shared = safe_dir / "shared"
    shared.mkdir()
    shared.chmod(mode)
    tool = copy_of("/bin/true", shared / "tool")
    why = "group-writable" if mode == 0o775 else "world-writable"
    assert f"parent directory {shared} is {why}" in resolve_refused(tool, [str(tool)])


def test_an_executable_under_tmp_is_refused_because_tmp_is_world_writable(
    tmp_path: Path,
) -> None:
    tool = copy_of("/bin/true", tmp_path / "tool")
    assert "is world-writable" in resolve_refused(tool, [str(tool)])


@needs_root
def test_an_executable_owned_by_another_user_is_refused(safe_dir: Path) -> None:
    tool = copy_of("/bin/true", safe_dir / "tool")
    os.chown(tool, 12345, 12345)
    assert f"file {tool} is owned by uid 12345, not root or us" in resolve_refused(
        tool, [str(tool)]
    )


@needs_root
def test_an_executable_in_a_directory_owned_by_another_user_is_refused(safe_dir: Path) -> None:
    theirs = safe_dir / "theirs"
    theirs.mkdir()
    tool = copy_of("/bin/true", theirs / "tool")
    os.chown(theirs, 12345, 12345)
    assert f"parent directory {theirs} is owned by uid 12345" in resolve_refused(tool, [str(tool)])


# --- nothing runs: refusals happen before anything is spawned -----------------------------


def _sh_copy(directory: Path, mode: int) -> str:
    return str(copy_of("/bin/sh", directory / "mysh", mode))


def _echo_link_to_sh(directory: Path) -> str:
    (directory / "echo").symlink_to("/bin/sh")
    return str(directory / "echo")


@pytest.mark.parametrize(
    ("make_argv0", "allow_itself", "needle"),
    [
        (lambda d: "/bin/sh;id", False, "not in the allow-list"),
        (lambda d: "/bin/../bin/sh", False, f"resolves to {SH}"),
        (lambda d: "/usr/bin/../../bin/sh", False, f"resolves to {SH}"),
        (lambda d: "sh", False, "a bare name"),
        (lambda d: f"$(touch {d}/marker)", False, "must be an absolute path"),
        (_echo_link_to_sh, False, f"resolves to {SH}"),
        (lambda d: _sh_copy(d, 0o777), True, "world-writable"),
        (lambda d: _sh_copy(d, 0o755), True, "world-writable"),  # /tmp above it
    ],
    ids=["semicolon", "dotdot", "dotdot2", "bare", "subst", "symlink", "ww-file", "ww-dir"],
)
def test_a_refused_argv0_never_starts_a_process(
    sandbox: Sandbox,
    tmp_path: Path,
    make_argv0: Callable[[Path], str],
    allow_itself: bool,
    needle: str,
) -> None:
    marker = tmp_path / "marker"
    argv0 = make_argv0(tmp_path)
    req = ExecRequest(
        command_id="hostile",
        argv=(argv0, "-c", f"touch {marker}"),
        allowed_executables=(argv0,) if allow_itself else ("/bin/echo",),
        limits=LIMITS,
    )
    with pytest.raises(ExecutableRefused, match="refused") as info:
        sandbox.run(req)
    assert needle in str(info.value)
    assert not marker.exists()
    runs = tmp_path / "runs"
    assert not runs.exists() or not any(runs.iterdir())  # not even a private directory


@pytest.mark.parametrize(
    ("argv", "env"),
    [
        (("/bin/echo", "a\x00b"), {}),
        (("/bin/echo",), {"A": "x\x00"}),
        (("/bin/echo",), {"A=B": ""}),
    ],
)
def test_the_sandbox_refuses_what_execve_would_choke_on(
    sandbox: Sandbox, argv: tuple[str, ...], env: dict[str, str]
) -> None:
    req = ExecRequest("hostile", argv, ("/bin/echo",), LIMITS, env=env)
    with pytest.raises(SandboxError, match=r"NUL byte|invalid environment variable"):
        sandbox.run(req)


# --- metacharacters as *arguments* are inert: no shell is ever used ------------------------

INJECTION = "; rm -rf / $(id) `id` | cat > {out}"


@pytest.mark.slow
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_metacharacters_in_arguments_reach_the_program_verbatim(
    producer: Producer, workers: Callable[..., WorkerProc], tmp_path: Path
) -> None:
    out = tmp_path / "x"
    text = INJECTION.format(out=out)
    workers("alpha")
    r = producer.submit(CommandSpec(tenant="alpha", argv=["/bin/echo", text, "&&", "$HOME"]))
    rec = producer.wait(r.id, timeout=30)
    assert rec.state is State.SUCCEEDED and rec.exit_code == 0
    assert rec.stdout == f"{text} && $HOME\n"
    assert not out.exists()


# --- the producer: refusals are recorded, never crash the store ---------------------------


@pytest.mark.parametrize(
    "fields",
    [
        {"argv": ["/bin/sh;id"]},
        {"argv": ["/bin/ech\u043e"]},
        {"cpu_s": MAX_LIMIT_INT},
        {"memory_mb": MAX_LIMIT_INT},
        {"timeout_s": 1e308},
        {"compensate": ["/bin/true"], "compensate_limits": {"timeout_s": 1e308}},
        {"compensate": ["/bin/true"], "compensate_limits": {"cpu_s": MAX_LIMIT_INT}},
    ],
    ids=["semicolon", "cyrillic", "cpu", "memory", "timeout", "comp-timeout", "comp-cpu"],
)
def test_extreme_specs_are_refused_by_policy_and_recorded_as_rejected(
    producer: Producer, fields: dict[str, object]
) -> None:
    with pytest.raises(PolicyDenied) as info:
        producer.submit(spec(principal="\u202eeve\u200d", **fields))
    assert info.value.command_id is not None
    assert producer.get(info.value.command_id).state is State.REJECTED


# --- NUL bytes ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"argv": ["/bin/echo\x00/bin/sh"]}, "argv[0] contains a NUL byte"),
        ({"argv": ["/bin/echo", "a\x00b"]}, "argv[1] contains a NUL byte"),
        ({"compensate": ["/bin/true", "\x00"]}, "compensate[1] contains a NUL byte"),
        ({"env": {"A": "x\x00y"}}, "env A contains a NUL byte"),
        ({"env": {"A\x00B": "x"}}, "env name 'A\\x00B' is not a valid variable name"),
        ({"secrets": {"TOKEN": "s3cr3t\x00"}}, "secrets TOKEN contains a NUL byte"),
        ({"secrets": {"TOK\x00EN": "x"}}, "secrets name 'TOK\\x00EN' is not a valid"),
        ({"snapshot_paths": ["/tmp/a\x00b"]}, "is not an absolute path"),
        ({"idempotency_key": "k\x00"}, "idempotency_key: must be 1-200 printable ASCII"),
        ({"tenant": "alpha\x00"}, "is not a tenant name"),
        ({"principal": "bob\x00"}, "principal contains a NUL byte"),
    ],
)
def test_a_nul_byte_anywhere_is_refused(fields: dict[str, object], needle: str) -> None:
    message = spec_refused(**fields)
    assert needle in message
    assert "s3cr3t" not in message


def test_a_nul_byte_in_argv0_is_refused_by_the_sandbox_too() -> None:
    assert "NUL byte" in resolve_refused("/bin/echo\x00/bin/sh", ["/bin/echo"])


# --- unicode look-alikes --------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv0",
    [
        "/bin/ech\u043e",  # Cyrillic o
        "/bin/\u0435cho",  # Cyrillic e
        "/bin/\u200decho",  # zero-width joiner
        "/bin/ec\u200bho",  # zero-width space
        "/bin/\u202eohce",  # right-to-left override
        "/bin/echo\u00a0",  # no-break space
        "/bin/echo\u0301",  # combining accent
        "/bin\u2215echo",  # division slash
    ],
)
def test_a_look_alike_absolute_path_is_not_the_allowed_program(argv0: str) -> None:
    denied = policy_refused(argv0)
    assert denied.rule == "executables" and repr(argv0) in str(denied)
    assert "not in the allow-list" in resolve_refused(argv0)


@pytest.mark.parametrize("argv0", ["\uff0fbin/echo", "\u2044bin/echo", "\u200b/bin/echo"])
def test_a_look_alike_slash_is_not_an_absolute_path(argv0: str) -> None:
    assert "argv[0] must be an absolute path" in spec_refused(argv=[argv0])
    assert "a relative path" in resolve_refused(argv0, [argv0])


# --- lone surrogates (not UTF-8) ----------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"argv": ["/bin/ech\ud800"]}, "argv: argv[0] is not valid UTF-8 text"),
        ({"argv": ["/bin/echo", "\udcff"]}, "argv: argv[1] is not valid UTF-8 text"),
        ({"compensate": ["/bin/true", "\ud800x"]}, "compensate[1] is not valid UTF-8 text"),
        ({"env": {"A": "\udfff"}}, "env A is not valid UTF-8 text"),
        ({"env": {"\ud800": "x"}}, "is not a valid variable name"),
        ({"secrets": {"T": "\ud800"}}, "secrets T is not valid UTF-8 text"),
        ({"snapshot_paths": ["/tmp/\udc80"]}, "snapshot path is not valid UTF-8 text"),
        ({"idempotency_key": "k\ud800"}, "idempotency_key"),
        ({"tenant": "alph\ud800"}, "tenant"),
        ({"principal": "bob\ud800"}, "principal"),
    ],
)
def test_a_lone_surrogate_is_refused(fields: dict[str, object], needle: str) -> None:
    assert needle in spec_refused(**fields)


# --- sizes ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        (
            {"argv": ["/bin/echo", "x" * 40 * 1024]},
            f"argv[1] is 40960 bytes, more than {MAX_ARG_BYTES}",
        ),
        (
            {"argv": ["/bin/echo", "\u20ac" * 11_000]},  # 11,000 characters but 33,000 bytes
            f"argv[1] is 33000 bytes, more than {MAX_ARG_BYTES}",
        ),
        ({"argv": ["/bin/echo"] * 2000}, f"argv has 2000 arguments, more than {MAX_ARGS}"),
        ({"argv": ["/bin/echo"] + ["x" * 30_000] * 5}, f"bytes in all, more than {MAX_ARGV_BYTES}"),
        (
            {"compensate": ["/bin/true"] * 2000},
            f"compensate has 2000 arguments, more than {MAX_ARGS}",
        ),
        (
            {"env": {f"V{i}": "x" for i in range(MAX_ENV_VARS + 1)}},
            f"env has {MAX_ENV_VARS + 1} variables, more than {MAX_ENV_VARS}",
        ),
        ({"env": {"BIG": "x" * 9000}}, f"env BIG is 9000 bytes, more than {MAX_ENV_VALUE_BYTES}"),
        (
            {"secrets": {f"S{i}": "x" * 8000 for i in range(9)}},
            f"bytes in all, more than {MAX_ENV_BYTES}",
        ),
        ({"env": {"A" * 129: "x"}}, "is not a valid variable name"),
        ({"snapshot_paths": ["/tmp/a"] * 33}, "33 paths, more than 32"),
        ({"principal": "p" * 201}, "principal"),
        ({"cpu_s": MAX_LIMIT_INT + 1}, "cpu_s: Input should be less than or equal to"),
        ({"memory_mb": 2**64}, "memory_mb: Input should be less than or equal to"),
        ({"timeout_s": 10**400}, "timeout_s: Input should be a valid number"),
        ({"timeout_s": float("inf")}, "timeout_s: Input should be a finite number"),
        ({"timeout_s": float("nan")}, "timeout_s"),
        (
            {"compensate": ["/bin/true"], "compensate_limits": {"timeout_s": 10**400}},
            "compensate_limits.timeout_s",
        ),
        (
            {"compensate": ["/bin/true"], "compensate_limits": {"memory_mb": 2**40}},
            "compensate_limits.memory_mb",
        ),
        ({"max_retries": 10**30, "retry_safe": True}, "max_retries"),
    ],
)
def test_oversized_input_is_refused_naming_the_limit(
    fields: dict[str, object], needle: str
) -> None:
    assert needle in spec_refused(**fields)


def test_the_largest_sizes_allowed_are_accepted() -> None:
    # The control for the limits above: exactly at each limit is fine.
    spec(argv=["/bin/echo", "x" * MAX_ARG_BYTES])
    spec(argv=["/bin/echo"] * MAX_ARGS)
    spec(cpu_s=MAX_LIMIT_INT, memory_mb=MAX_LIMIT_INT, idempotency_key="k" * 200, tenant="a" * 40)


# --- environment names, dangerous variables -------------------------------------------------


@pytest.mark.parametrize("kind", ["env", "secrets"])
@pytest.mark.parametrize(
    "name", ["A=B", "=A", "X\nY", "X\n", "\nX", "1ABC", "", "A B", "\u00c4", "A-B"]
)
def test_a_malformed_variable_name_is_refused(kind: str, name: str) -> None:
    message = spec_refused(**{kind: {name: "v"}})
    assert f"{kind} name {name!r} is not a valid variable name" in message


@pytest.mark.parametrize("kind", ["env", "secrets"])
@pytest.mark.parametrize(
    "name",
    [
        "LD_PRELOAD",
        "LD_LIBRARY_PATH",
        "LD_AUDIT",
        "PYTHONPATH",
        "BASH_ENV",
        "ENV",
        "DYLD_INSERT_LIBRARIES",
        "GCONV_PATH",
        "NODE_OPTIONS",
        "PERL5OPT",
    ],
)
def test_a_variable_that_changes_which_code_runs_is_refused(kind: str, name: str) -> None:
    message = spec_refused(**{kind: {name: "/tmp/evil.so"}})
    assert f"{kind} may not set {name}: it changes which code runs" in message
    assert "evil" not in message


@pytest.mark.parametrize("kind", ["env", "secrets"])
@pytest.mark.parametrize("name", ["PATH", "HOME", "TMPDIR", "TRACEPARENT", "PWD"])
def test_a_variable_execq_sets_is_refused(kind: str, name: str) -> None:
    assert f"{kind} may not set {name}: execq sets it" in spec_refused(**{kind: {name: "/tmp"}})


# --- idempotency keys and tenant names ----------------------------------------------------


@pytest.mark.parametrize(
    "key",
    [
        "has space",
        "tab\tkey",
        "nl\nkey",
        "trailing\n",
        "\x01",
        "del\x7f",
        "caf\u00e9",
        "",
        "k" * 201,
    ],
)
def test_a_malformed_idempotency_key_is_refused(key: str) -> None:
    message = spec_refused(idempotency_key=key)
    assert "idempotency_key: must be 1-200 printable ASCII characters without spaces" in message


@pytest.mark.parametrize(
    "tenant",
    ["../alpha", "alpha/../beta", "Alpha", "a" * 41, "", "alpha\n", " alpha", "1alpha", "al pha"],
)
def test_a_malformed_tenant_name_is_refused(tenant: str) -> None:
    assert f"tenant: {tenant!r} is not a tenant name" in spec_refused(tenant=tenant)


# --- argument tricks: options in every spelling, code through options and variables -----------

# The shipped prod tenant's rm rules, and tar/rsync/find closed with execq's table of their
# dangerous options (what `execq config check` asks for).
TRICKS = load_tenants(ROOT / "config" / "tenants.yaml", env="dev")
PROD = TRICKS.tenants["prod"]
TOOLS = TenantsFile.model_validate(
    {
        "tenants": {
            "tools": {
                "executables": ["/bin/tar", "/usr/bin/rsync", "/usr/bin/find"],
                "deny_options": {
                    p: list(lookup(p).options)  # type: ignore[union-attr]
                    for p in ("/bin/tar", "/usr/bin/rsync", "/usr/bin/find")
                },
            }
        }
    }
).for_env("dev")


@pytest.mark.parametrize(
    "args",
    [
        ["--rec", "--force", "/srv/x"],  # GNU takes any unambiguous prefix
        ["--recursive", "--force", "/srv/x"],
        ["--recursive=yes", "/srv/x"],
        ["--r", "/srv/x"],
        ["-r", "-f", "/srv/x"],
        ["-Rf", "/srv/x"],
        ["-rfv", "/srv/x"],
        ["-fR", "/srv/x"],
        ["-vrf", "/srv/x"],
        ["/srv/x", "-r"],  # after an operand: GNU permutes
        ["-v", "/srv/x", "--recu"],
        ["-f", "/srv/x"],
        ["--no-preserve-root", "-v", "/srv/x"],
        ["--no-pres", "/srv/x"],
    ],
)
def test_every_spelling_of_a_denied_rm_option_is_refused(args: list[str]) -> None:
    with pytest.raises(PolicyDenied) as info:
        policy.check_tenant(CommandSpec(tenant="prod", argv=["/bin/rm", *args]), PROD)
    assert info.value.rule.startswith("deny_options:")
    assert "spells the option" in str(info.value)


def test_after_a_double_dash_a_dash_word_is_a_file_name() -> None:
    policy.check_tenant(CommandSpec(tenant="prod", argv=["/bin/rm", "--", "-r"]), PROD)


@pytest.mark.parametrize(
    "argv",
    [
        ["/bin/tar", "--checkpoint=1", "--checkpoint-action=exec=id", "-cf", "/dev/null", "/"],
        ["/bin/tar", "-cf", "/dev/null", "--checkpoint-act=exec=id", "/"],
        ["/bin/tar", "cIf", "sh -c id", "x.tgz", "/"],  # old-style bundle, -I attached
        ["/bin/tar", "-xf", "x.tar", "--to-command=sh"],
        ["/bin/tar", "-x", "--use-compress-prog=sh", "-f", "x.tar"],
        ["/usr/bin/rsync", "-e", "sh -c id", "a", "b:"],
        ["/usr/bin/rsync", "-ve'sh -c id'", "a", "b:"],
        ["/usr/bin/rsync", "--rsh=sh", "a", "b:"],
        ["/usr/bin/rsync", "--rsync-path=sh -c id", "a", "b:"],
        ["/usr/bin/find", "/", "-exec", "id", ";"],
        ["/usr/bin/find", "--", "/", "-execdir", "id", ";"],
        ["/usr/bin/find", "/", "-delete"],
    ],
)
def test_code_execution_through_a_programs_options_is_refused(argv: list[str]) -> None:
    with pytest.raises(PolicyDenied) as info:
        policy.check_tenant(CommandSpec(tenant="tools", argv=argv), TOOLS.tenants["tools"])
    assert info.value.rule.startswith("deny_options:")


@pytest.mark.parametrize(
    "name",
    [
        "TAR_OPTIONS",
        "PERLLIB",
        "RUBYLIB",
        "NODE_PATH",
        "JAVA_TOOL_OPTIONS",
        "OPENSSL_CONF",
        "GIT_SSH_COMMAND",
        "PYTHONHOME",
        "RSYNC_RSH",
        "BASH_FUNC_ls%%",
        "LD_AUDIT",
    ],
)
def test_code_execution_through_the_environment_is_refused_in_env_and_secrets(
    name: str,
) -> None:
    for field in ("env", "secrets"):
        with pytest.raises(SpecError, match=r"is not a valid variable name|changes which code"):
            spec(**{field: {name: "x"}})


def test_a_variable_nobody_listed_is_refused_by_the_allow_list() -> None:
    with pytest.raises(PolicyDenied) as info:
        policy.check_tenant(
            CommandSpec(tenant="prod", argv=["/bin/echo"], env={"SOME_TOOL_FLAGS": "x"}), PROD
        )
    assert info.value.rule == "env_allow" and "SOME_TOOL_FLAGS" in str(info.value)


def test_an_option_trick_is_recorded_rejected_and_audited(producer: Producer) -> None:
    with pytest.raises(PolicyDenied) as info:
        producer.submit(spec(tenant="beta", argv=["/bin/echo", "x"], env={"TZ_HACK": "1"}))
    rec = producer.get(info.value.command_id or "")
    assert rec.state is State.REJECTED and rec.failure_reason == "policy:env_allow"
    phases = [e.phase for e in producer.audit_events(command_id=rec.id)]
    assert phases == ["parse", "authz", "abort"]
