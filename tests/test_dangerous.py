"""The table of programs and variables that run other code, and the warnings built from it."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest

from producer.dangerous import (
    DANGEROUS_ENV,
    DANGEROUS_ENV_PREFIXES,
    PROGRAMS,
    DangerousProgram,
    dangerous_env,
    lookup,
    raw_argv_warnings,
)
from producer.options import denied_option
from producer.tenants import DENIED_OPTION

TAR_OPTIONS = next(program for program in PROGRAMS if program.name == "tar").options


def program_file(directory: Path, name: str) -> Path:
    path = directory / name
    path.write_text("#!/bin/sh\n")
    return path


# --- lookup -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("basename", "family"),
    [
        ("python3.11", "python"),
        ("python3", "python"),
        ("perl5.36", "perl"),
        ("vim.basic", "vim"),
        ("gawk-5.1.0", "awk"),
        ("mawk", "awk"),
        ("dash", "sh"),
        ("bash", "bash"),
        ("tar", "tar"),
        ("env", "env"),
        ("busybox", "busybox"),
    ],
)
def test_a_program_is_found_by_its_name_without_a_version(
    tmp_path: Path, basename: str, family: str
) -> None:
    program = lookup(str(program_file(tmp_path, basename)))
    assert program is not None
    assert program.name == family


def test_a_program_is_found_by_the_file_a_symlink_resolves_to(tmp_path: Path) -> None:
    (tmp_path / "tool").symlink_to(program_file(tmp_path, "python3.11"))
    program = lookup(str(tmp_path / "tool"))
    assert program is not None
    assert program.runs_code


def test_the_resolved_file_decides_over_the_name_a_symlink_gives(tmp_path: Path) -> None:
    (tmp_path / "tar").symlink_to(program_file(tmp_path, "perl"))
    program = lookup(str(tmp_path / "tar"))
    assert program is not None
    assert program.name == "perl"


def test_a_symlink_to_an_unknown_file_is_found_by_its_own_name(tmp_path: Path) -> None:
    (tmp_path / "rsync").symlink_to(program_file(tmp_path, "blob"))
    program = lookup(str(tmp_path / "rsync"))
    assert program is not None
    assert program.name == "rsync"


@pytest.mark.parametrize("basename", ["ls", "echo", "cat", "rm", "systemctl", "python-config"])
def test_an_ordinary_program_is_not_in_the_table(tmp_path: Path, basename: str) -> None:
    assert lookup(str(program_file(tmp_path, basename))) is None


def test_a_path_that_does_not_exist_is_found_by_its_name() -> None:
    program = lookup("/nonexistent/bin/xargs")
    assert program is not None
    assert program.runs_operands


# --- the table itself -------------------------------------------------------------------------


def test_each_name_belongs_to_one_program() -> None:
    counts = Counter(name for program in PROGRAMS for name in program.names)
    assert [name for name, count in counts.items() if count > 1] == []


@pytest.mark.parametrize("program", PROGRAMS, ids=lambda program: program.name)
def test_every_listed_option_is_a_spelling_the_tenants_file_accepts(
    program: DangerousProgram,
) -> None:
    assert [option for option in program.options if not DENIED_OPTION.fullmatch(option)] == []


@pytest.mark.parametrize("program", PROGRAMS, ids=lambda program: program.name)
def test_every_listed_option_is_refused_by_the_matcher_when_denied(
    program: DangerousProgram,
) -> None:
    for option in program.options:
        assert denied_option(["x", option, "y"], program.options) is not None


def test_every_program_says_why_it_is_listed() -> None:
    assert [program.name for program in PROGRAMS if not program.why.strip()] == []
    assert [
        program.name
        for program in PROGRAMS
        if not (program.options or program.runs_code or program.runs_operands)
    ] == []


# --- variables --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "LD_PRELOAD",
        "LD_AUDIT",
        "DYLD_INSERT_LIBRARIES",
        "GCONV_PATH",
        "MALLOC_CHECK_",
        "GLIBC_TUNABLES",
        "BASH_ENV",
        "BASH_FUNC_ls%%",
        "PYTHONHOME",
        "PYTHONWARNINGS",
        "TAR_OPTIONS",
        "RSYNC_RSH",
        "GIT_SSH_COMMAND",
        "GIT_CONFIG_COUNT",
        "GIT_CONFIG_KEY_0",
        "LUA_INIT",
        "JAVA_TOOL_OPTIONS",
        "LESSOPEN",
    ],
)
def test_a_variable_that_runs_other_code_has_a_reason(name: str) -> None:
    reason = dangerous_env(name)
    assert reason
    assert "\n" not in reason


@pytest.mark.parametrize(
    "name", ["LANG", "LC_ALL", "TZ", "PYTHONUNBUFFERED", "PYTHONDONTWRITEBYTECODE", "TERM", "USER"]
)
def test_an_ordinary_variable_has_no_reason(name: str) -> None:
    assert dangerous_env(name) is None


def test_every_variable_the_first_release_refused_is_still_listed() -> None:
    first_release = {
        "BASH_ENV", "ENV", "IFS", "SHELLOPTS", "PS4", "PYTHONSTARTUP", "PYTHONPATH", "PERL5OPT",
        "PERL5LIB", "RUBYOPT", "NODE_OPTIONS", "LOCPATH", "NLSPATH", "HOSTALIASES", "RES_OPTIONS",
    }  # fmt: skip
    assert first_release <= DANGEROUS_ENV
    assert {"LD_", "DYLD_", "GCONV_", "MALLOC_"} <= set(DANGEROUS_ENV_PREFIXES)


def test_every_listed_variable_is_a_valid_name() -> None:
    valid = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
    assert [name for name in DANGEROUS_ENV if not valid.fullmatch(name)] == []
    assert all(dangerous_env(name) for name in DANGEROUS_ENV)


# --- warnings ---------------------------------------------------------------------------------


def test_no_warning_when_only_actions_run(tmp_path: Path) -> None:
    python = str(program_file(tmp_path, "python3"))
    assert raw_argv_warnings("acme", [python], {}, raw_argv=False) == []


def test_an_interpreter_is_allowed_only_through_actions(tmp_path: Path) -> None:
    python = str(program_file(tmp_path, "python3"))
    [warning] = raw_argv_warnings("acme", [python], {python: ["-c", "-m"]}, raw_argv=True)
    assert warning.startswith(f"tenant 'acme': {python} runs any code it is given")
    assert warning.endswith("allow it only through actions (raw_argv: false)")


def test_a_program_that_runs_its_operands_is_allowed_only_through_actions(
    tmp_path: Path,
) -> None:
    env = str(program_file(tmp_path, "env"))
    [warning] = raw_argv_warnings("acme", [env], {}, raw_argv=True)
    assert f"{env} runs its operands as a command" in warning
    assert "deny_options cannot prevent" in warning


def test_options_left_open_are_named(tmp_path: Path) -> None:
    tar = str(program_file(tmp_path, "tar"))
    [warning] = raw_argv_warnings("acme", [tar], {tar: ["-I", "--to-command"]}, raw_argv=True)
    assert "--checkpoint-action, --use-compress-program, --rsh-command" in warning
    assert " -I," not in warning
    assert "--to-command" not in warning.split("(")[0]


def test_a_tenant_denying_every_dangerous_option_gets_no_warning(tmp_path: Path) -> None:
    tar = str(program_file(tmp_path, "tar"))
    assert raw_argv_warnings("acme", [tar], {tar: list(TAR_OPTIONS)}, raw_argv=True) == []


def test_deny_options_keys_are_compared_after_resolving_symlinks(tmp_path: Path) -> None:
    tar = program_file(tmp_path, "tar")
    (tmp_path / "gtar").symlink_to(tar)
    deny = {str(tmp_path / "gtar"): list(TAR_OPTIONS)}
    assert raw_argv_warnings("acme", [str(tar)], deny, raw_argv=True) == []


def test_options_denied_for_another_program_do_not_count(tmp_path: Path) -> None:
    tar = str(program_file(tmp_path, "tar"))
    rm = str(program_file(tmp_path, "rm"))
    assert len(raw_argv_warnings("acme", [tar], {rm: list(TAR_OPTIONS)}, raw_argv=True)) == 1


def test_one_warning_per_dangerous_program_and_none_for_the_rest(tmp_path: Path) -> None:
    names = ["echo", "tar", "ls", "bash", "xargs", "rsync"]
    executables = [str(program_file(tmp_path, name)) for name in names]
    warnings = raw_argv_warnings("acme", executables, {}, raw_argv=True)
    assert [warning.split()[2] for warning in warnings] == executables[1:2] + executables[3:]
