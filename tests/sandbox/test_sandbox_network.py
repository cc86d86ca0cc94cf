"""Without network a command reaches no socket at all: not the host's Unix sockets (which a
network namespace leaves reachable), not the Internet; its own socketpair() still works."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import platform
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from producer.errors import SandboxError
from workers.sandbox import ExecRequest, Sandbox, detect_capabilities
from workers.sandbox.model import FsView
from workers.sandbox.wrapper import NO_NETWORK, build_launch

from .helpers import ATTEMPT, LIMITS, PY, python

CAPS = detect_capabilities()
POSTGRES = "/var/run/postgresql/.s.PGSQL.5432"
needs_namespace = pytest.mark.skipif(
    os.geteuid() != 0 or CAPS.unshare is None, reason="a network namespace needs root and unshare"
)
needs_launcher = pytest.mark.skipif(CAPS.launcher is None, reason="execq-launch is not built")

# Every way this payload tries to reach a socket, and the errno each attempt ended with.
REACH = (
    ATTEMPT
    + """
import json, os, socket, sys
stream_path, dgram_path, postgres = sys.argv[1:4]
def unix_connect(path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(path)
    s.sendall(b"hello")
    s.close()
def connect_a_pair_end():
    a, _ = socket.socketpair()
    a.connect(stream_path)
def datagram_through_a_pair():
    a, _ = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    a.sendto(b"hello", dgram_path)
def pair(kind):
    a, b = socket.socketpair(socket.AF_UNIX, kind)
    a.sendall(b"x")
    assert b.recv(1) == b"x"
attempt("unix_socket", lambda: socket.socket(socket.AF_UNIX))
attempt("unix_connect", lambda: unix_connect(stream_path))
attempt("connect_a_pair_end", connect_a_pair_end)
attempt("datagram_through_a_pair", datagram_through_a_pair)
if os.path.exists(postgres):
    attempt("postgres", lambda: unix_connect(postgres))
attempt("inet", lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM))
attempt("inet6", lambda: socket.socket(socket.AF_INET6, socket.SOCK_DGRAM))
attempt("netlink", lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW))
attempt("socketpair", lambda: pair(socket.SOCK_STREAM))
attempt("socketpair_seqpacket", lambda: pair(socket.SOCK_SEQPACKET))
print(json.dumps(out))
"""
)


@dataclasses.dataclass
class Listeners:
    """A stream and a datagram Unix socket of the test's own, under a tmp directory."""

    stream_path: str
    dgram_path: str
    stream: socket.socket
    dgram: socket.socket

    def received(self) -> list[bytes]:
        """What reached either socket so far (without waiting)."""
        got = []
        try:
            conn, _ = self.stream.accept()
        except BlockingIOError:
            pass
        else:
            with conn:
                conn.settimeout(5)
                got.append(conn.recv(16))
        with contextlib.suppress(BlockingIOError):
            got.append(self.dgram.recv(16))
        return got


@pytest.fixture
def listeners(tmp_path: Path) -> Iterator[Listeners]:
    stream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dgram = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    with stream, dgram:
        found = Listeners(
            str(tmp_path / "stream.sock"), str(tmp_path / "dgram.sock"), stream, dgram
        )
        stream.bind(found.stream_path)
        stream.listen(4)
        dgram.bind(found.dgram_path)
        stream.setblocking(False)
        dgram.setblocking(False)
        yield found


def reach(listeners: Listeners, *, network: bool, **changes: object) -> ExecRequest:
    req = python(REACH, listeners.stream_path, listeners.dgram_path, POSTGRES)
    return dataclasses.replace(req, network=network, **changes)  # type: ignore[arg-type]


@needs_namespace
def test_without_network_no_socket_of_any_family_can_be_opened_or_reached(
    sandbox: Sandbox, listeners: Listeners
) -> None:
    req = reach(listeners, network=False)
    if sandbox.capabilities.launcher is None:
        # prlimit + setpriv could only give a network namespace: refused rather than leaky.
        with pytest.raises(SandboxError, match=r"need execq-launch .* Unix sockets reachable"):
            sandbox.run(req)
        return
    r = sandbox.run(req)
    assert r.exit_code == 0, r.stderr
    seen = json.loads(r.stdout)
    refused = {name: errno.EACCES for name in seen if not name.startswith("socketpair")}
    assert {name: seen[name] for name in refused} == refused
    assert ("postgres" in seen) == os.path.exists(POSTGRES)
    assert seen["socketpair"] == seen["socketpair_seqpacket"] == "ok"
    assert listeners.received() == []
    assert (
        r.enforced["network"]
        == NO_NETWORK
        == "none (network namespace, sockets refused by seccomp)"
    )


def test_with_network_the_same_command_reaches_the_tests_sockets(
    sandbox: Sandbox, listeners: Listeners
) -> None:
    # The control: the payload above would notice a connection, and the test would see it.
    r = sandbox.run(reach(listeners, network=True))
    assert r.exit_code == 0, r.stderr
    seen = json.loads(r.stdout)
    assert seen["unix_socket"] == seen["unix_connect"] == seen["inet"] == "ok"
    assert seen["inet6"] in ("ok", errno.EAFNOSUPPORT)  # a host without IPv6 says so
    assert seen["datagram_through_a_pair"] == "ok"
    assert seen["connect_a_pair_end"] == errno.EISCONN  # the kernel's answer, not a filter's
    assert seen.get("postgres", "ok") == "ok"
    assert sorted(listeners.received()) == [b"hello", b"hello"]
    assert "network" not in r.enforced


@needs_namespace
@needs_launcher
@pytest.mark.skipif(os.geteuid() != 0, reason="switching uids needs root")
def test_a_run_as_command_gets_the_filter_after_its_identity_switch(tmp_path: Path) -> None:
    code = """
import os, socket
status = dict(line.split(":\\t", 1) for line in open("/proc/self/status").read().splitlines())
try:
    socket.socket(socket.AF_UNIX)
    made = "ok"
except OSError as exc:
    made = exc.errno
print(os.getuid(), status["NoNewPrivs"], status["Seccomp"], made)
"""
    req = dataclasses.replace(python(code), run_as=(41704, 41704), network=False)
    with Sandbox(workdir_root=tmp_path / "runs", capabilities=CAPS) as sb:
        r = sb.run(req)
    # Seccomp 2: filter mode.
    assert (r.exit_code, r.stdout.split()) == (0, ["41704", "1", "2", str(errno.EACCES)]), r.stderr
    assert r.enforced["identity"] == "uid 41704 gid 41704"


@needs_launcher
@pytest.mark.skipif(CAPS.bwrap is None, reason=f"no bubblewrap: {CAPS.bwrap_problem}")
def test_a_filesystem_view_without_network_refuses_sockets_after_bubblewrap_set_up(
    tmp_path: Path,
) -> None:
    code = "import socket\ntry:\n    socket.socket()\nexcept PermissionError:\n    print('refused')"
    code += "\na, b = socket.socketpair()\na.sendall(b'ok')\nprint(b.recv(2).decode())"
    req = dataclasses.replace(python(code), network=False, filesystem=FsView(tmp_mb=8))
    with Sandbox(workdir_root=tmp_path / "runs", capabilities=CAPS) as sb:
        r = sb.run(req)
    assert (r.exit_code, r.stdout.split()) == (0, ["refused", "ok"]), r.stderr
    assert r.enforced["network"] == NO_NETWORK


@needs_namespace
@needs_launcher
def test_only_the_last_launcher_step_installs_the_filter() -> None:
    built = build_launch(
        "/bin/true", [], LIMITS, CAPS, memory_cgroup=True, pids_cgroup=True, kill="killpg",
        network=False,
    )  # fmt: skip
    argv = list(built.argv)
    assert argv.count("--no-sockets") == 1
    # After the namespace wrapper (which needs its own sockets), right before the command.
    assert argv.index(CAPS.unshare or "") < argv.index("--no-sockets") < argv.index("/bin/true")


def test_without_the_launcher_a_command_without_network_is_refused_naming_why() -> None:
    caps = dataclasses.replace(CAPS, euid=0, unshare="/usr/bin/unshare", launcher=None)
    why = caps.can_isolate(run_as=False, no_network=True)
    assert why is not None and "execq-launch" in why and "Unix sockets reachable" in why
    assert caps.can_isolate(run_as=False, no_network=False) is None
    with pytest.raises(SandboxError, match="execq-launch"):
        build_launch(
            "/bin/true", [], LIMITS, caps, memory_cgroup=True, pids_cgroup=True, kill="killpg",
            network=False,
        )  # fmt: skip
    broken = dataclasses.replace(caps, launcher="/opt/execq-launch", socket_filter=False)
    assert "/opt/execq-launch --no-sockets, which failed" in (
        broken.can_isolate(run_as=False, no_network=True) or ""
    )


@needs_launcher
def test_the_filter_is_found_working_on_this_host() -> None:
    assert CAPS.socket_filter, CAPS.notes
    assert CAPS.can_isolate(run_as=False, no_network=True) in (
        None,
        "commands without network need a root worker and unshare (util-linux)",
    )


def launch_filtered(code: str) -> subprocess.CompletedProcess[str]:
    assert CAPS.launcher is not None
    return subprocess.run(
        [CAPS.launcher, "--no-sockets", "--", PY, "-c", code],
        capture_output=True, text=True, timeout=10, check=False,
    )  # fmt: skip


IO_URING = """
import ctypes, os
params = ctypes.create_string_buffer(120)
fd = ctypes.CDLL(None, use_errno=True).syscall(425, 4, params)  # io_uring_setup
print("ok" if fd >= 0 else os.strerror(ctypes.get_errno()))
"""


@needs_launcher
def test_io_uring_which_could_open_and_connect_sockets_is_refused() -> None:
    plain = subprocess.run([PY, "-c", IO_URING], capture_output=True, text=True, check=False)
    done = launch_filtered(IO_URING)
    assert (done.returncode, done.stdout.strip()) == (0, "Operation not permitted"), done.stderr
    # Where the kernel has io_uring at all, the same call works without the filter.
    assert plain.stdout.strip() in {"ok", "Operation not permitted", "Function not implemented"}


# Another ABI of the same CPU has other syscall numbers: the filter kills rather than allow.
X32_GETPID = "import ctypes\nctypes.CDLL(None).syscall(0x40000000 | 39)\nprint('alive')"
I386_GETPID = """
import ctypes, mmap
code = b"\\xb8\\x14\\x00\\x00\\x00\\xcd\\x80\\xc3"  # mov eax, 20 (getpid); int 0x80; ret
page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
page.write(code)
ctypes.CFUNCTYPE(ctypes.c_int)(ctypes.addressof(ctypes.c_char.from_buffer(page)))()
print("alive")
"""


@needs_launcher
@pytest.mark.skipif(platform.machine() != "x86_64", reason="x32 and i386 calls are x86_64's")
@pytest.mark.parametrize("code", [X32_GETPID, I386_GETPID], ids=["x32", "i386"])
def test_a_system_call_of_another_abi_kills_the_command(code: str) -> None:
    plain = subprocess.run([PY, "-c", code], capture_output=True, text=True, check=False)
    if plain.stdout.strip() != "alive":
        pytest.skip(f"this kernel does not run that ABI at all ({plain.returncode})")
    done = launch_filtered(code)
    assert (done.returncode, done.stdout) == (-signal.SIGSYS, ""), done.stderr
