"""Host detection: cheap, cached, and honest about what each limit relies on."""

from __future__ import annotations

import os
from pathlib import Path

from workers.sandbox import Capabilities, detect_capabilities
from workers.sandbox.cgroup import migrations_favored

from .helpers import execq_cgroups

LIMIT_NAMES = {"time", "cpu", "memory", "processes", "file_size", "open_files", "core", "kill"}
LIMIT_NAMES |= {"capabilities", "disk", "kernel_files", "signals"}


def test_detection_is_cached_per_process() -> None:
    assert detect_capabilities() is detect_capabilities()


def test_detection_leaves_no_probe_behind() -> None:
    # Its cost (a few spawns, once per process) is measured, not asserted: tests share a host.
    detect_capabilities.cache_clear()
    caps = detect_capabilities()
    assert f"execq-probe-{os.getpid()}" not in execq_cgroups()
    assert caps.euid == os.geteuid()


def test_the_summary_names_every_limit_and_its_mechanism() -> None:
    line = detect_capabilities().summary()
    fields = dict(item.split("=", 1) for item in line.split())
    assert set(fields) >= LIMIT_NAMES
    assert fields["time"] == "wall-clock" and fields["kill"].startswith("killpg")
    assert "\n" not in line


def test_a_host_without_anything_still_gets_a_summary_of_fallbacks() -> None:
    bare = Capabilities(
        euid=1000,
        prlimit=None,
        setpriv=None,
        pdeathsig=False,
        subreaper=False,
        memory_v1=None,
        memsw=False,
        pids_v1=None,
        cgroup_v2=None,
        cgroup_kill=False,
    )
    m = bare.mechanisms()
    assert m["kill"] == "killpg"
    assert m["memory"].startswith("rlimit-after-spawn-as")
    assert m["processes"] == "rlimit-after-spawn-nproc (per-uid)"
    assert m["parent_death"] == "none"
    # Nothing to drop capabilities with: commands would keep the worker's, so none run.
    assert m["capabilities"] == "kept (no execq-launch or setpriv)"
    assert bare.can_isolate(run_as=False, no_network=False) is not None
    assert m["disk"] == "unlimited (a mount namespace needs a root worker)"
    assert m["kernel_files"] == "not writable (commands are not root)"
    assert m["signals"] == "uid (kernel checks only)"


def test_this_root_host_enforces_everything_with_cgroups() -> None:
    caps = detect_capabilities()
    if os.geteuid() != 0 or caps.memory_v1 is None:
        return  # documented by the summary instead; nothing more to assert off such hosts
    m = caps.mechanisms()
    assert m["memory"] == "cgroup-v1"
    assert m["processes"] == "cgroup-v1-pids"
    assert m["cpu"] == m["file_size"] == m["open_files"] == m["core"] == "rlimit"
    if caps.launcher is not None:
        assert m["capabilities"] == "none (bounding set empty, no_new_privs)"
        assert m["disk"] == "tmpfs (own mount namespace)", caps.notes
        assert m["kernel_files"] == "read-only (own mount namespace)"


def test_favordynmods_is_read_from_any_cgroup_mount(tmp_path: Path) -> None:
    # The option is host-wide once any hierarchy has it; other filesystems' options do not
    # count, and an unreadable mount table means "not known to be on".
    mounts = tmp_path / "mounts"
    mounts.write_text(
        "tmpfs /sys/fs/cgroup tmpfs rw,favordynmods 0 0\n"
        "cgroup /sys/fs/cgroup/memory cgroup rw,relatime,memory 0 0\n"
    )
    assert not migrations_favored(str(mounts))
    mounts.write_text(
        "cgroup /sys/fs/cgroup/memory cgroup rw,relatime,memory 0 0\n"
        "cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime,favordynmods 0 0\n"
    )
    assert migrations_favored(str(mounts))
    assert not migrations_favored(str(tmp_path / "missing"))
