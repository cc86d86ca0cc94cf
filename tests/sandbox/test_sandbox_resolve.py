"""resolve_executable: only absolute, allow-listed, tamper-proof files get through."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from producer.errors import ExecutableRefused
from workers.sandbox import resolve_executable

ECHO = os.path.realpath("/bin/echo")
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="chown to another uid needs root")


def tool(directory: Path, name: str = "tool", mode: int = 0o755) -> Path:
    """A real executable copy of /bin/true."""
    path = directory / name
    shutil.copyfile("/bin/true", path)
    path.chmod(mode)
    return path


def refused(argv0: str | Path, allowed: list[str | Path]) -> str:
    with pytest.raises(ExecutableRefused) as info:
        resolve_executable(str(argv0), [str(a) for a in allowed])
    return str(info.value)


def test_an_allow_listed_path_resolves_to_its_realpath() -> None:
    assert resolve_executable("/bin/echo", ["/bin/echo"]) == ECHO


def test_bin_echo_and_usr_bin_echo_are_the_same_program() -> None:
    assert resolve_executable("/usr/bin/echo", ["/bin/echo"]) == ECHO
    assert resolve_executable("/bin/echo", ["/usr/bin/echo"]) == ECHO


def test_dot_dot_inside_an_absolute_path_is_resolved_first() -> None:
    assert resolve_executable("/usr/bin/../bin/echo", ["/bin/echo"]) == ECHO


def test_a_relative_path_is_refused() -> None:
    assert "relative path" in refused("./echo", ["/bin/echo"])
    assert "relative path" in refused("bin/echo", ["/bin/echo"])


def test_a_bare_name_is_refused_even_when_it_is_on_the_path() -> None:
    message = refused("echo", ["/bin/echo", "echo"])
    assert "bare name" in message and "'echo'" in message


@given(st.text(max_size=30).filter(lambda s: not s.startswith("/")))
def test_nothing_but_an_absolute_path_is_ever_accepted(argv0: str) -> None:
    with pytest.raises(ExecutableRefused):
        resolve_executable(argv0, [argv0, "/bin/echo"])


def test_a_path_outside_the_allow_list_is_refused() -> None:
    message = refused("/bin/ls", ["/bin/echo"])
    assert "not in the allow-list" in message and "/bin/ls" in message


def test_a_symlink_to_a_file_outside_the_allow_list_is_refused(safe_dir: Path) -> None:
    link = safe_dir / "echo"
    link.symlink_to("/usr/bin/id")
    message = refused(link, ["/bin/echo"])
    assert f"resolves to {os.path.realpath('/usr/bin/id')}" in message and str(link) in message


def test_an_allow_listed_symlink_in_a_safe_directory_is_followed(safe_dir: Path) -> None:
    link = safe_dir / "say"
    link.symlink_to("/bin/echo")
    assert resolve_executable(str(link), [str(link)]) == ECHO


def test_a_symlink_in_a_world_writable_directory_is_refused(safe_dir: Path) -> None:
    shared = safe_dir / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    link = shared / "echo"
    link.symlink_to("/bin/echo")
    message = refused(link, ["/bin/echo"])
    assert f"{shared} is world-writable" in message


def test_a_nonexistent_file_is_refused(safe_dir: Path) -> None:
    missing = safe_dir / "missing"
    assert "does not exist" in refused(missing, [missing])


def test_a_directory_is_refused() -> None:
    assert "not a regular file" in refused("/usr/bin", ["/usr/bin"])


def test_a_file_without_execute_permission_is_refused(safe_dir: Path) -> None:
    data = tool(safe_dir, "data", 0o644)
    assert "not executable" in refused(data, [data])


def test_a_world_writable_file_is_refused(safe_dir: Path) -> None:
    path = tool(safe_dir, mode=0o757)
    message = refused(path, [path])
    assert f"file {path} is world-writable" in message


def test_a_group_writable_file_is_refused(safe_dir: Path) -> None:
    path = tool(safe_dir, mode=0o775)
    assert "group-writable" in refused(path, [path])


def test_a_file_in_a_world_writable_directory_is_refused(safe_dir: Path) -> None:
    shared = safe_dir / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    path = tool(shared)
    message = refused(path, [path])
    assert f"parent directory {shared} is world-writable" in message


def test_a_file_under_tmp_is_refused_because_tmp_is_world_writable(tmp_path: Path) -> None:
    path = tool(tmp_path)
    assert "world-writable" in refused(path, [path])


@needs_root
def test_a_file_owned_by_another_user_is_refused(safe_dir: Path) -> None:
    path = tool(safe_dir)
    os.chown(path, 12345, 12345)
    assert "owned by uid 12345" in refused(path, [path])


def test_a_safe_private_copy_is_accepted(safe_dir: Path) -> None:
    path = tool(safe_dir)
    assert resolve_executable(str(path), [str(path)]) == str(path)


def test_a_nul_byte_is_refused() -> None:
    assert "NUL" in refused("/bin/echo\x00", ["/bin/echo"])
