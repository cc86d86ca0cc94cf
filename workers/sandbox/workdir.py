"""The private directory of one run: its cwd, HOME and TMPDIR, removed whatever happens."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

log = logging.getLogger(__name__)


@contextlib.contextmanager
def private_dir(root: Path, command_id: str) -> Iterator[str]:
    """A fresh 0700 directory under root, unique per run (mkdtemp), removed on the way out."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", command_id)[:48] or "run"
    path = tempfile.mkdtemp(prefix=f"{safe}-", dir=root)
    try:
        yield path
    finally:
        _remove_tree(path)


def _remove_tree(path: str) -> None:
    """rmtree that also gets through directories the command chmod'ed to 000."""

    def retry(func: Callable[..., object], failed: str, _exc: object) -> None:
        with contextlib.suppress(OSError):
            os.chmod(os.path.dirname(failed), 0o700)
            if os.path.isdir(failed) and not os.path.islink(failed):
                os.chmod(failed, 0o700)
                shutil.rmtree(failed, onerror=retry)  # nested 000 directories too
            else:
                func(failed)

    try:
        os.rmdir(path)  # the common case: the command left nothing behind
        return
    except OSError:
        pass
    shutil.rmtree(path, onerror=retry)
    if os.path.lexists(path):
        log.warning("sandbox: could not remove private directory %s", path)
