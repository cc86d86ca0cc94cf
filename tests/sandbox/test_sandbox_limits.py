"""Each limit stops a payload that breaks it, and the result says which one did."""

from __future__ import annotations

import os
import resource
import signal

import psutil
import pytest

from workers.sandbox import Sandbox

from .helpers import CAPS, python, request

needs_memory_cgroup = pytest.mark.skipif(
    CAPS.memory_v1 is None,
    reason="needs a writable cgroup-v1 memory hierarchy (root on a v1/hybrid host); "
    f"here: {CAPS.notes}",
)
needs_pids_limit = pytest.mark.skipif(
    CAPS.pids_v1 is None and CAPS.is_root,
    reason="as root without a pids cgroup nothing limits processes (RLIMIT_NPROC is ignored)",
)
needs_prlimit = pytest.mark.skipif(CAPS.prlimit is None, reason="needs /usr/bin/prlimit")

FORK_UNTIL_REFUSED = """
import errno, os, time
kids, err = [], None
for _ in range(50):
    try:
        pid = os.fork()
    except OSError as e:
        err = errno.errorcode[e.errno]
        break
    if pid == 0:
        time.sleep(5)
        os._exit(0)
    kids.append(pid)
print(len(kids), err)
"""


def test_a_wall_clock_timeout_stops_a_sleeper(sandbox: Sandbox) -> None:
    r = sandbox.run(request("/bin/sleep", "30", timeout_s=0.5))
    assert r.killed == "timeout"
    assert (r.exit_code, r.signal) == (128 + signal.SIGTERM, signal.SIGTERM)
    assert 0.5 <= r.duration_s < 2
    with pytest.raises(ProcessLookupError):
        os.kill(r.pid, 0)


def test_a_command_ignoring_sigterm_is_killed_after_the_grace(sandbox: Sandbox) -> None:
    code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(30)"
    r = sandbox.run(python(code, timeout_s=0.5))
    assert r.killed == "timeout" and r.signal == signal.SIGKILL
    assert 1.0 <= r.duration_s < 3


@needs_prlimit
def test_cpu_time_limit_stops_a_busy_loop(sandbox: Sandbox) -> None:
    r = sandbox.run(python("while True: pass", cpu_s=1, timeout_s=10))
    assert r.killed == "cpu"
    assert (r.exit_code, r.signal) == (128 + signal.SIGXCPU, signal.SIGXCPU)
    # The kernel checks RLIMIT_CPU on its own clock; rusage, read after the kill, has been
    # seen at 0.897 s for a 1 s limit on a loaded machine.
    assert r.cpu_s is not None and 0.8 <= r.cpu_s < 2.5
    assert r.enforced["cpu"] == "rlimit"


@needs_prlimit
def test_a_busy_loop_ignoring_sigxcpu_dies_at_the_hard_cpu_limit(sandbox: Sandbox) -> None:
    code = "import signal; signal.signal(signal.SIGXCPU, signal.SIG_IGN)\nwhile True: pass"
    r = sandbox.run(python(code, cpu_s=1, timeout_s=10))
    assert r.killed == "cpu" and r.signal == signal.SIGKILL


@needs_memory_cgroup
def test_memory_limit_kills_a_1gib_allocation_under_64mib(sandbox: Sandbox) -> None:
    r = sandbox.run(python("x = b'a' * (1 << 30)", memory_mb=64))
    assert r.killed == "memory"
    assert (r.exit_code, r.signal) == (137, signal.SIGKILL)
    assert r.peak_memory_bytes is not None and r.peak_memory_bytes <= 64 * 1024 * 1024
    assert r.enforced["memory"] == "cgroup-v1"


@needs_memory_cgroup
def test_the_next_run_gets_its_own_memory_limit_back(sandbox: Sandbox) -> None:
    assert sandbox.run(python("x = b'a' * (1 << 30)", memory_mb=64)).killed == "memory"
    r = sandbox.run(python("x = b'a' * (200 << 20); print(len(x))", memory_mb=512))
    assert (r.exit_code, r.killed, r.stdout) == (0, None, f"{200 << 20}\n")


@needs_pids_limit
def test_a_fork_loop_hits_eagain_at_the_process_limit(sandbox: Sandbox) -> None:
    r = sandbox.run(python(FORK_UNTIL_REFUSED, processes=10))
    forked, err = r.stdout.split()
    assert err == "EAGAIN"
    assert int(forked) == 9  # the payload itself is the tenth
    assert r.enforced["processes"] in ("cgroup-v1-pids", "rlimit-nproc (per-uid)")


@needs_pids_limit
def test_a_process_limit_of_one_still_lets_the_command_start(sandbox: Sandbox) -> None:
    r = sandbox.run(python(FORK_UNTIL_REFUSED, processes=1))
    assert r.exit_code == 0 and r.stdout.split() == ["0", "EAGAIN"]


@needs_prlimit
def test_file_size_limit_kills_dd_with_sigxfsz(sandbox: Sandbox) -> None:
    r = sandbox.run(
        request("/usr/bin/dd", "if=/dev/zero", "of=big", "bs=1M", "count=20", file_mb=5)
    )
    assert r.killed == "file_size"
    assert (r.exit_code, r.signal) == (128 + signal.SIGXFSZ, signal.SIGXFSZ)


@needs_prlimit
def test_file_size_limit_caps_what_a_python_payload_writes(sandbox: Sandbox) -> None:
    code = """
import errno, os
try:
    with open("big", "wb") as f:
        for _ in range(20):
            f.write(b"x" * (1 << 20))
except OSError as e:
    print(errno.errorcode[e.errno], os.path.getsize("big"))
"""
    r = sandbox.run(python(code, file_mb=5))
    assert r.stdout.split() == ["EFBIG", str(5 << 20)]


@needs_prlimit
def test_open_files_limit_gives_emfile(sandbox: Sandbox) -> None:
    code = """
import errno
files = []
try:
    for _ in range(100):
        files.append(open("/dev/null"))
except OSError as e:
    print(len(files), errno.errorcode[e.errno])
"""
    r = sandbox.run(python(code, open_files=32))
    opened, err = r.stdout.split()
    assert err == "EMFILE" and int(opened) < 32


@needs_prlimit
def test_core_dumps_are_disabled(sandbox: Sandbox) -> None:
    r = sandbox.run(python("import resource; print(resource.getrlimit(resource.RLIMIT_CORE))"))
    assert r.stdout == "(0, 0)\n"


def test_an_output_flood_is_kept_bounded_and_counted(sandbox: Sandbox) -> None:
    rss_before = psutil.Process().memory_info().rss
    r = sandbox.run(request("/usr/bin/head", "-c", str(200 << 20), "/dev/zero", output_kb=64))
    assert r.exit_code == 0
    assert r.stdout_bytes == 200 << 20 and r.stdout_truncated
    assert f"…[{(200 << 20) - 2 * 65536} bytes omitted]…" in r.stdout
    assert len(r.stdout) <= 2 * 65536 + 100
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert peak_kib * 1024 - rss_before < 64 << 20, "capture buffered the flood"
    assert r.enforced["output"] == "head+tail"


def test_floods_on_both_streams_at_once_do_not_deadlock(sandbox: Sandbox) -> None:
    code = """
import os
chunk = b"e" * (1 << 20)
for i in range(50):
    os.write(1, b"%d" % i + chunk)
    os.write(2, chunk)
os.write(1, b"THE END")
"""
    r = sandbox.run(python(code, output_kb=16, timeout_s=20))
    assert r.exit_code == 0 and r.killed is None
    assert r.stdout_bytes > 50 << 20 and r.stderr_bytes == 50 << 20
    assert r.stdout.endswith("THE END") and r.stderr_truncated
    assert len(r.stderr) <= 2 * 16384 + 100


def test_an_endless_writer_is_stopped_by_the_timeout_with_bounded_output(
    sandbox: Sandbox,
) -> None:
    r = sandbox.run(request("/usr/bin/yes", timeout_s=0.5, output_kb=4))
    assert r.killed == "timeout"
    assert r.stdout_bytes > 1 << 20 and len(r.stdout) <= 2 * 4096 + 100
    assert r.stdout.startswith("y\ny\n")


def test_a_small_output_limit_keeps_head_and_tail(sandbox: Sandbox) -> None:
    r = sandbox.run(python("print('A' * 3000 + 'B' * 3000 + 'C' * 3000, end='')", output_kb=2))
    assert r.stdout == "A" * 2048 + "\n…[4904 bytes omitted]…\n" + "C" * 2048
