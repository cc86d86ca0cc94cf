"""Cost of dropping capabilities, the signal scope and the private tmpfs (not collected).

Run as root: .venv/bin/python tests/sandbox/bench_privileges.py [N]
Each variant is measured interleaved with the others (A, B, C, A, B, C...) so that a busy
machine slows them alike; medians in milliseconds.
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

from workers.sandbox import ExecRequest, Limits, Sandbox, detect_capabilities
from workers.sandbox.disk import private_disk
from workers.sandbox.launcher import kernel_files

LIMITS = Limits(timeout_s=10, cpu_s=5, memory_mb=256, processes=64, output_kb=64, file_mb=64)
TRUE = ExecRequest("bench", ("/bin/true",), ("/bin/true",), LIMITS)


def interleaved(n: int, variants: dict[str, Callable[[], object]]) -> dict[str, float]:
    """Median milliseconds of each variant over n runs."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(n):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 1000)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 300
    caps = detect_capabilities()
    launcher = caps.launcher
    assert launcher is not None and caps.mounts_privately, f"needs execq-launch as root: {caps}"
    read_only = [arg for path in kernel_files() for arg in ("--read-only", path)]

    def run(*args: str) -> None:
        subprocess.run([launcher, *args, "--", "/bin/true"], capture_output=True, check=True)

    def mounted(*args: str) -> Callable[[], None]:
        def go() -> None:
            with tempfile.TemporaryDirectory() as where:
                disk = private_disk(LIMITS.disk_mb)
                try:
                    subprocess.run(
                        [launcher, "--mount", f"{disk.fd}:{where}", *args, "--", "/bin/true"],
                        capture_output=True, check=True, pass_fds=(disk.fd,),
                    )  # fmt: skip
                finally:
                    disk.close()

        return go

    def tmpdir_only() -> None:
        with tempfile.TemporaryDirectory():
            run("--keep-caps", "--pdeathsig")

    launches = interleaved(
        n,
        {
            "capabilities kept": lambda: run("--keep-caps", "--pdeathsig"),
            "capabilities dropped": lambda: run("--pdeathsig"),
            "+ landlock signal scope": lambda: run("--pdeathsig", "--scope-signals"),
            "+ read-only kernel files": lambda: run("--pdeathsig", "--scope-signals", *read_only),
            "kept, with a temp dir": tmpdir_only,
            "+ private tmpfs": mounted("--pdeathsig", "--scope-signals", *read_only),
        },
    )
    for name, ms in launches.items():
        print(f"execq-launch /bin/true, {name:26}: {ms:.3f} ms (N={n})")

    plain = dataclasses.replace(caps, private_mounts=False, landlock_abi=0)
    with tempfile.TemporaryDirectory() as tmp:
        sandboxes = {
            "no mounts, no landlock": Sandbox(workdir_root=Path(tmp, "a"), capabilities=plain),
            "+ landlock": Sandbox(
                workdir_root=Path(tmp, "b"),
                capabilities=dataclasses.replace(plain, landlock_abi=caps.landlock_abi),
            ),
            "+ tmpfs, read-only kernel": Sandbox(workdir_root=Path(tmp, "c"), capabilities=caps),
        }
        for sb in sandboxes.values():
            sb.run(TRUE)  # warm-up: creates the cgroup once, as a pool process would
        runs = interleaved(
            n, {name: (lambda sb=sb: sb.run(TRUE)) for name, sb in sandboxes.items()}
        )
        for sb in sandboxes.values():
            sb.close()
    for name, ms in runs.items():
        print(f"Sandbox.run /bin/true, {name:26}: {ms:.3f} ms (N={n})")


if __name__ == "__main__":
    main()
