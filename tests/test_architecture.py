"""Dependencies flow one way: workers -> producer -> the settings modules (which import nothing
else from execq); `config/` holds configuration files only."""

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


# Read at start by everything, before anything else of execq is set up.
SETTINGS_MODULES = {"settings", "tenants", "action_model", "keys", "signing_settings"}


def module_imports(path: Path) -> set[str]:
    """Fully qualified modules imported by one file (absolute imports only)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_settings_modules_import_only_each_other() -> None:
    bad = {}
    for name in SETTINGS_MODULES:
        execq = {
            m
            for m in module_imports(ROOT / "producer" / f"{name}.py")
            if m.split(".")[0] in {"producer", "workers"}
        }
        outside = {m for m in execq if m.removeprefix("producer.") not in SETTINGS_MODULES}
        if outside:
            bad[name] = outside
    assert bad == {}


def test_config_holds_no_python() -> None:
    # Web backends have their own `config` package (Django's `config/settings/`); an importable
    # `config` here would shadow it or be shadowed by it.
    assert sorted(p.name for p in (ROOT / "config").rglob("*.py")) == []
