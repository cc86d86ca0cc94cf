"""Fixtures for the sandbox tests: one Sandbox per test, closed (cgroups removed) afterwards."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from workers.sandbox import Sandbox, detect_capabilities
from workers.sandbox.capabilities import launcher_candidates

CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}


@pytest.fixture(params=["execq-launch", "prlimit+setpriv"])
def sandbox(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Sandbox]:
    """A Sandbox starting commands through execq-launch, and one through prlimit + setpriv
    (what a host without a C compiler gets): every sandbox test holds for both."""
    caps = detect_capabilities()
    if request.param == "execq-launch" and caps.launcher is None:
        if CI:
            pytest.fail(f"execq-launch is not built ({launcher_candidates()}): run make install")
        pytest.skip("execq-launch is not built (make install builds it)")
    if request.param == "prlimit+setpriv":
        caps = replace(caps, launcher=None)
    sb = Sandbox(workdir_root=tmp_path / "runs", capabilities=caps)
    yield sb
    sb.close()


@pytest.fixture
def pids_dir(tmp_path: Path) -> Path:
    """Where payloads write the pids of what they spawn (outside their removed workdir)."""
    d = tmp_path / "pids"
    d.mkdir()
    return d
