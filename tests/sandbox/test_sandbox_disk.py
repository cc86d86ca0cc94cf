"""disk_mb: all a command may write in its private directory (HOME, TMPDIR, cwd), in total.

Beyond it, writes fail with ENOSPC and the run is recorded as stopped by the disk limit; the
private directory is still removed afterwards, and the host never sees the command's mount.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from producer import policy
from producer.errors import IsolationUnavailable
from producer.tenants import LimitCeilings, LimitOverrides, Tenant
from workers.sandbox import Limits, Sandbox
from workers.sandbox.model import FsView

from .helpers import CAPS, python

needs_private_mounts = pytest.mark.skipif(
    not CAPS.mounts_privately, reason=f"no private tmpfs here: {CAPS.disk_problem}"
)

# Writes 1 MiB files under $HOME, $TMPDIR (the same place) and the cwd until one fails; or,
# for a run_as uid (which cannot pass through pytest's 0700 tmp directory), in the cwd only.
FILL = """
import errno, json, os, sys
written, err = 0, None
places = sys.argv[2:] or [os.environ["HOME"], os.environ["TMPDIR"], "."]
try:
    for i in range(int(sys.argv[1])):
        with open(os.path.join(places[i % len(places)], f"f{i}"), "wb") as f:
            f.write(b"x" * (1 << 20))
        written += 1
except OSError as exc:
    err = errno.errorcode[exc.errno]
st = os.stat(".")
print(json.dumps({"written": written, "err": err, "dev": st.st_dev, "uid": st.st_uid,
                  "mode": oct(st.st_mode & 0o7777), "files": len(os.listdir("."))}))
sys.exit(1 if err else 0)
"""


@pytest.fixture
def own_mounts(tmp_path: Path) -> Iterator[Sandbox]:
    """A Sandbox with this host's launcher: the command's own mount namespace and tmpfs."""
    with Sandbox(workdir_root=tmp_path / "runs", capabilities=CAPS) as sb:
        yield sb


def _disk_label(sandbox: Sandbox, mb: int, *, view: bool = False) -> str:
    if sandbox.capabilities.mounts_privately:
        return f"tmpfs {mb} MB (own mount namespace)"
    if view:
        return f"tmpfs {mb} MB (bubblewrap)"
    return sandbox.capabilities.disk_label


@needs_private_mounts
def test_writing_past_the_limit_in_several_files_gets_enospc_and_names_the_limit(
    own_mounts: Sandbox,
) -> None:
    r = own_mounts.run(python(FILL, "10", disk_mb=4))
    seen = json.loads(r.stdout)
    assert (seen["written"], seen["err"]) == (4, "ENOSPC"), r.stderr
    assert r.exit_code == 1 and r.killed == "disk"
    assert r.enforced["disk"] == "tmpfs 4 MB (own mount namespace)"
    # Its own filesystem, not the host's; and nothing of it left once the run is over.
    assert seen["dev"] != os.stat(own_mounts.workdir_root).st_dev
    assert list(own_mounts.workdir_root.iterdir()) == []


def test_writing_within_the_limit_works(sandbox: Sandbox) -> None:
    r = sandbox.run(python(FILL, "3", disk_mb=4))
    seen = json.loads(r.stdout)
    assert (r.exit_code, r.killed, seen["written"], seen["files"]) == (0, None, 3, 3), r.stderr
    assert r.enforced["disk"] == _disk_label(sandbox, 4)
    assert list(sandbox.workdir_root.iterdir()) == []


@needs_private_mounts
def test_a_run_as_command_gets_a_tmpfs_of_its_own_uid_mode_0700(
    own_mounts: Sandbox,
) -> None:
    req = dataclasses.replace(python(FILL, "3", ".", disk_mb=2), run_as=(41720, 41720))
    r = own_mounts.run(req)
    seen = json.loads(r.stdout)
    assert (seen["written"], seen["err"], r.killed) == (2, "ENOSPC", "disk"), r.stderr
    assert (seen["uid"], seen["mode"]) == (41720, "0o700")
    assert list(own_mounts.workdir_root.iterdir()) == []


@needs_private_mounts
def test_a_command_failing_for_another_reason_is_not_blamed_on_the_disk(
    own_mounts: Sandbox,
) -> None:
    r = own_mounts.run(python("open('a', 'wb').write(b'x' * 1024); raise SystemExit(3)", disk_mb=4))
    assert (r.exit_code, r.killed) == (3, None)


@pytest.mark.skipif(CAPS.bwrap is None, reason=f"no bubblewrap: {CAPS.bwrap_problem}")
def test_in_a_filesystem_view_the_limit_holds_too(sandbox: Sandbox) -> None:
    req = dataclasses.replace(python(FILL, "10", disk_mb=3), filesystem=FsView(tmp_mb=8))
    r = sandbox.run(req)
    seen = json.loads(r.stdout)
    assert (seen["written"], seen["err"]) == (3, "ENOSPC"), r.stderr
    assert r.enforced["disk"] == _disk_label(sandbox, 3, view=True)
    # bubblewrap's own tmpfs (no launcher) cannot be looked at afterwards: exit code only.
    assert r.killed == ("disk" if sandbox.capabilities.mounts_privately else None)
    assert list(sandbox.workdir_root.iterdir()) == []


@pytest.mark.skipif(CAPS.memory_v1 is None, reason="needs a cgroup-v1 memory hierarchy")
@needs_private_mounts
def test_what_the_command_writes_counts_against_its_memory_too(own_mounts: Sandbox) -> None:
    # tmpfs lives in memory, charged to the command's memory cgroup: past memory_mb the
    # command is killed for memory before it reaches a larger disk limit.
    r = own_mounts.run(python(FILL, "100", disk_mb=200, memory_mb=48, file_mb=200, timeout_s=20))
    assert r.killed == "memory", (r.exit_code, r.stdout, r.stderr)
    # Freed with the command's mount namespace: the next run has its memory back.
    again = own_mounts.run(python(FILL, "16", disk_mb=200, memory_mb=48))
    assert (again.exit_code, again.killed) == (0, None), again.stderr


def test_a_host_without_private_mounts_says_so_and_refuses_a_required_disk_limit(
    tmp_path: Path,
) -> None:
    caps = dataclasses.replace(CAPS, private_mounts=False)
    assert caps.mechanisms()["disk"].startswith("unlimited (")
    with pytest.raises(IsolationUnavailable, match="'disk' is required"):
        Sandbox(workdir_root=tmp_path, capabilities=caps, required={"disk"})
    with Sandbox(workdir_root=tmp_path / "runs", capabilities=caps) as sb:
        r = sb.run(python(FILL, "6", disk_mb=4))
    assert (r.exit_code, r.killed) == (0, None), r.stderr
    assert r.enforced["disk"] == caps.disk_label
    non_root = dataclasses.replace(CAPS, euid=1000)
    assert non_root.disk_label == "unlimited (a mount namespace needs a root worker)"


def test_the_tenant_ceiling_reaches_the_sandbox_request() -> None:
    assert LimitCeilings().disk_mb == Limits(1, 1, 1, 1, 1, 1).disk_mb == 256
    ceilings = LimitOverrides(disk_mb=16).applied_to(LimitCeilings(disk_mb=64))
    tenant = Tenant(executables=("/bin/true",), limits=ceilings)
    limits = policy.effective_limits(tenant, timeout_s=None, cpu_s=None, memory_mb=None)
    # workers.binding builds the sandbox's Limits from these fields, one for one.
    assert Limits(**vars(limits)).disk_mb == 16
    with pytest.raises(ValueError, match="disk_mb"):
        LimitCeilings(disk_mb=0)
