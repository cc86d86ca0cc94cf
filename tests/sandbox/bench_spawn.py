"""Spawn overhead of Sandbox.run vs a bare subprocess.run (not collected by pytest).

Run: .venv/bin/python tests/sandbox/bench_spawn.py [N]
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

from workers.sandbox import ExecRequest, Limits, Sandbox, detect_capabilities

LIMITS = Limits(timeout_s=10, cpu_s=5, memory_mb=256, processes=64, output_kb=64, file_mb=64)


def bench_bare(n: int) -> float:
    """Runs per second of subprocess.run(['/bin/true'], capture_output=True)."""
    t0 = time.perf_counter()
    for _ in range(n):
        subprocess.run(["/bin/true"], capture_output=True, check=True)
    return n / (time.perf_counter() - t0)


def bench_chain(n: int) -> float:
    """Runs per second of the bare wrapper chain (prlimit -> setpriv -> /bin/true)."""
    caps = detect_capabilities()
    chain: list[str] = []
    if caps.prlimit:
        chain += [caps.prlimit, "--cpu=5:6", "--fsize=67108864", "--nofile=256", "--core=0", "--"]
    if caps.setpriv and caps.pdeathsig:
        chain += [caps.setpriv, "--pdeathsig", "KILL", "--"]
    t0 = time.perf_counter()
    for _ in range(n):
        subprocess.run([*chain, "/bin/true"], capture_output=True, check=True)
    return n / (time.perf_counter() - t0)


def bench_sandbox(n: int, root: Path) -> float:
    """Runs per second of Sandbox.run for /bin/true with every limit this host supports."""
    req = ExecRequest("bench", ("/bin/true",), ("/bin/true",), LIMITS)
    with Sandbox(workdir_root=root) as sb:
        sb.run(req)  # warm-up: creates the cgroup once, as a pool process would
        t0 = time.perf_counter()
        for _ in range(n):
            r = sb.run(req)
            assert r.exit_code == 0, r
        return n / (time.perf_counter() - t0)


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 300
    print(detect_capabilities().summary())
    with tempfile.TemporaryDirectory() as tmp:
        bare = bench_bare(n)
        chain = bench_chain(n)
        sandbox = bench_sandbox(n, Path(tmp))
    print(f"bare subprocess.run  : {bare:7.1f} runs/s ({1000 / bare:.2f} ms each), N={n}")
    print(f"wrapper chain only   : {chain:7.1f} runs/s ({1000 / chain:.2f} ms each), N={n}")
    print(f"Sandbox.run          : {sandbox:7.1f} runs/s ({1000 / sandbox:.2f} ms each), N={n}")
    print(
        f"sandbox overhead     : {1000 / sandbox - 1000 / bare:.2f} ms per run, of which "
        f"{1000 / chain - 1000 / bare:.2f} ms are the two wrapper execs"
    )


if __name__ == "__main__":
    main()
