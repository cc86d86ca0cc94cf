"""The `EXECQ_*` names execq knows; any other in the environment stops a process at start.

The settings classes ignore variables they do not know, so a misspelt one
(`EXECQ_BROKER_URL` with a letter missing, say) would leave its setting at the default
without a word. Every execq process checks its environment first and refuses such a name,
naming the closest known one.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Iterator, Mapping

from pydantic import AliasChoices
from pydantic_settings import BaseSettings

from producer.settings import ConfigInvalid

PREFIX = "EXECQ_"
# Every module that defines a settings class read from EXECQ_* (a test keeps this complete).
SETTINGS_MODULES = ("producer.settings", "producer.signing_settings", "producer.keys")
# Read with os.environ rather than through a settings class.
READ_DIRECTLY = frozenset({"EXECQ_LAUNCHER"})
# Not read by execq, but set beside it: the image tag docker-compose.yml substitutes, and the
# test suite's and benchmark's own settings, which the execq processes they start inherit.
NEIGHBOURS = frozenset(
    {
        "EXECQ_VERSION",
        "EXECQ_TEST_REDIS_URL",
        "EXECQ_TEST_PG_URL",
        "EXECQ_BENCH_REDIS_URL",
        "EXECQ_BENCH_PG_URL",
        "EXECQ_BENCH_PG_DSN",
    }
)


def _settings_classes() -> Iterator[type[BaseSettings]]:
    for module in SETTINGS_MODULES:
        importlib.import_module(module)
    seen: set[type[BaseSettings]] = set()
    todo = list(BaseSettings.__subclasses__())
    while todo:
        cls = todo.pop()
        if cls not in seen:
            seen.add(cls)
            todo.extend(cls.__subclasses__())
            if str(cls.model_config.get("env_prefix", "")).upper().startswith(PREFIX):
                yield cls


def settings_names() -> frozenset[str]:
    """`EXECQ_<FIELD>` of every field of every settings class (aliases included)."""
    names: set[str] = set()
    for cls in _settings_classes():
        prefix = str(cls.model_config.get("env_prefix", "")).upper()
        for name, field in cls.model_fields.items():
            alias = field.validation_alias
            if isinstance(alias, str):
                names.add(alias.upper())
            elif isinstance(alias, AliasChoices):
                names.update(c.upper() for c in alias.choices if isinstance(c, str))
            else:
                names.add(prefix + name.upper())
    return frozenset(names)


def known_names() -> frozenset[str]:
    """Every EXECQ_* name that may be in an execq process's environment."""
    return settings_names() | READ_DIRECTLY | NEIGHBOURS


def unknown(environ: Mapping[str, str]) -> list[str]:
    """The EXECQ_* names in `environ` that execq does not know (settings are case-blind)."""
    known = known_names()
    return sorted(n for n in environ if n.upper().startswith(PREFIX) and n.upper() not in known)


def nearest(name: str) -> tuple[str, bool]:
    """The known name closest to `name`, and whether it is close enough to be a misspelling."""
    by_rest = {n.removeprefix(PREFIX): n for n in known_names()}
    rest = name.upper().removeprefix(PREFIX)
    for cutoff in (0.6, 0.0):
        found = difflib.get_close_matches(rest, sorted(by_rest), n=1, cutoff=cutoff)
        if found:
            return by_rest[found[0]], cutoff > 0
    raise AssertionError("known_names() is never empty")


def check(environ: Mapping[str, str]) -> None:
    """Raise ConfigInvalid, one line naming each unknown EXECQ_* variable and its nearest
    known name."""
    names = unknown(environ)
    if not names:
        return
    parts = []
    for name in names:
        known, close = nearest(name)
        hint = f"did you mean {known}?" if close else f"nothing close; the nearest is {known}"
        parts.append(f"{name} ({hint})")
    noun = "variable" if len(names) == 1 else "variables"
    raise ConfigInvalid(
        f"unknown setting {noun} {', '.join(parts)}: correct the spelling or unset it"
    )
