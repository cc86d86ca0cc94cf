"""Fixtures for the sandbox tests: one Sandbox per test, closed (cgroups removed) afterwards."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from workers.sandbox import Sandbox


@pytest.fixture
def sandbox(tmp_path: Path) -> Iterator[Sandbox]:
    sb = Sandbox(workdir_root=tmp_path / "runs")
    yield sb
    sb.close()


@pytest.fixture
def pids_dir(tmp_path: Path) -> Path:
    """Where payloads write the pids of what they spawn (outside their removed workdir)."""
    d = tmp_path / "pids"
    d.mkdir()
    return d
