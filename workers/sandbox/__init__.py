"""Run OS commands under limits, in a private directory, and leave nothing of them behind."""

from __future__ import annotations

from .capabilities import Capabilities, detect_capabilities
from .executor import Sandbox, sweep_stale
from .model import ExecRequest, ExecResult, Limits
from .resolve import resolve_executable

__all__ = [
    "Capabilities",
    "ExecRequest",
    "ExecResult",
    "Limits",
    "Sandbox",
    "detect_capabilities",
    "resolve_executable",
    "sweep_stale",
]
