"""A stand-in pool process: runs one command in a Sandbox until the test SIGKILLs it.

Usage: python pool_process.py WORKDIR_ROOT PIDS_DIR (not a test module).
"""

from __future__ import annotations

import sys
from pathlib import Path

from workers.sandbox import ExecRequest, Limits, Sandbox

PAYLOAD = """
import os, sys, time
def pidfile(d, name):
    tmp = os.path.join(d, name + ".tmp")
    with open(tmp, "w") as f:
        f.write(str(os.getpid()))
    os.rename(tmp, os.path.join(d, name + ".pid"))
d = sys.argv[1]
if os.fork() == 0:
    os.setsid()
    pidfile(d, "grandchild")
    time.sleep(60)
    os._exit(0)
pidfile(d, "command")
time.sleep(60)
"""


def main() -> None:
    root, pids = Path(sys.argv[1]), sys.argv[2]
    limits = Limits(timeout_s=60, cpu_s=60, memory_mb=256, processes=16, output_kb=4, file_mb=1)
    sandbox = Sandbox(workdir_root=root)
    req = ExecRequest(
        "pool", ("/usr/bin/python3", "-c", PAYLOAD, pids), ("/usr/bin/python3",), limits
    )
    sandbox.run(req)


if __name__ == "__main__":
    main()
