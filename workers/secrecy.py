"""Keys leave the worker's environment once read: not even root children find them there.

`os.environ.pop` only drops libc's pointer to "NAME=value"; the bytes stay in the process's
original environment block, which `/proc/PID/environ` shows to anyone allowed to read it (a
command running as root). So the value is overwritten in place first, then unset.
"""

from __future__ import annotations

import ctypes
import logging
import os
from collections.abc import Iterable

log = logging.getLogger("execq.worker")

# What a worker reads at start and never needs again in its environment.
KEY_VARIABLES = (
    "EXECQ_SIGNING_KEY",
    "EXECQ_SIGNING_ACCEPTED_KEYS",
    "EXECQ_SECRETS_KEY",
    "EXECQ_AUDIT_KEY",
)


def forget(names: Iterable[str] = KEY_VARIABLES) -> list[str]:
    """Wipe and unset each of `names` present in the environment; the names that were."""
    wanted = {name.encode() + b"=" for name in names if name in os.environ}
    if not wanted:
        return []
    try:
        libc = ctypes.CDLL(None)
        environ = ctypes.POINTER(ctypes.c_void_p).in_dll(libc, "environ")
        i = 0
        while environ[i]:
            address = environ[i]
            entry = ctypes.string_at(address)
            prefix = next((w for w in wanted if entry.startswith(w)), None)
            if prefix is not None:
                # Keep "NAME=" so the block stays well formed; zero the value's bytes.
                ctypes.memset(address + len(prefix), 0, len(entry) - len(prefix))
            i += 1
    except (OSError, ValueError, AttributeError) as exc:  # no libc `environ`: unset only
        log.warning("could not wipe key variables in place (%s); unsetting them", exc)
    gone = []
    for name in names:
        if os.environ.pop(name, None) is not None:
            gone.append(name)
    return gone
