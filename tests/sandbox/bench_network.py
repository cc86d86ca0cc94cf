"""Cost of the socket filter (`execq-launch --no-sockets`), not collected by pytest.

Run as root: .venv/bin/python tests/sandbox/bench_network.py [N]
Each pair is measured interleaved (A, B, A, B...) so that a busy machine slows both alike.
"""

from __future__ import annotations

import dataclasses
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from unittest import mock

from workers.sandbox import ExecRequest, Limits, Sandbox, detect_capabilities, wrapper

LIMITS = Limits(timeout_s=10, cpu_s=5, memory_mb=256, processes=64, output_kb=64, file_mb=64)
TRUE = ExecRequest("bench", ("/bin/true",), ("/bin/true",), LIMITS)


def interleaved(n: int, a: Callable[[], object], b: Callable[[], object]) -> tuple[float, float]:
    """Median milliseconds of a() and of b(), over n runs each."""
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(n):
        for fn, out in ((a, times[0]), (b, times[1])):
            t0 = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times[0]), statistics.median(times[1])


def run(argv: list[str]) -> None:
    subprocess.run(argv, capture_output=True, check=True)


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    caps = detect_capabilities()
    launcher = caps.launcher
    assert launcher is not None and caps.socket_filter, "needs execq-launch with --no-sockets"
    plain = [launcher, "--pdeathsig", "--"]
    filtered = [launcher, "--pdeathsig", "--no-sockets", "--"]

    a, b = interleaved(n, lambda: run([*plain, "/bin/true"]), lambda: run([*filtered, "/bin/true"]))
    print(f"execq-launch /bin/true         : {a:.3f} ms, with --no-sockets {b:.3f} ms (N={n})")

    count = 500_000  # dd: one read and one write per byte, 2 * count system calls
    dd = ["/bin/dd", "if=/dev/zero", "of=/dev/null", "bs=1", f"count={count}"]
    a, b = interleaved(max(n // 20, 5), lambda: run([*plain, *dd]), lambda: run([*filtered, *dd]))
    per_call_ns = (b - a) * 1e6 / (2 * count)
    print(f"dd {2 * count} system calls    : {a:.1f} ms, filtered {b:.1f} ms "
          f"({per_call_ns:+.1f} ns per call)")  # fmt: skip

    unfiltered_identity = wrapper._identity

    def without_filter(*args: object, **kw: object) -> list[str]:
        return unfiltered_identity(*args, **{**kw, "no_sockets": False})  # type: ignore[arg-type]

    offline = dataclasses.replace(TRUE, network=False)
    with tempfile.TemporaryDirectory() as tmp, Sandbox(workdir_root=Path(tmp)) as sb:
        sb.run(offline)  # warm-up: creates the cgroup once, as a pool process would

        def old() -> None:
            with mock.patch.object(wrapper, "_identity", without_filter):
                sb.run(offline)

        online, _ = interleaved(n, lambda: sb.run(TRUE), lambda: None)
        a, b = interleaved(n, old, lambda: sb.run(offline))
    print(f"Sandbox.run /bin/true, network : {online:.3f} ms")
    print(f"Sandbox.run, no network        : {a:.3f} ms namespace only, {b:.3f} ms with the filter")


if __name__ == "__main__":
    main()
