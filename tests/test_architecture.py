"""Dependencies flow one way: workers -> producer -> config."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def imports_of(package: str) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for path in (ROOT / package).rglob("*.py"):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
        found[str(path.relative_to(ROOT))] = names
    return found


def test_producer_never_imports_workers() -> None:
    bad = {f: n for f, n in imports_of("producer").items() if "workers" in n}
    assert bad == {}


def test_config_imports_nothing_from_execq() -> None:
    bad = {
        f: n & {"producer", "workers"}
        for f, n in imports_of("config").items()
        if n & {"producer", "workers"}
    }
    assert bad == {}
