"""A full disk under the audit file: the JSON-lines file and the witness on a small tmpfs of
their own, filled to the last byte mid-stream, kept full a while, then given space again."""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from chaos.stack import Stack

if TYPE_CHECKING:
    from chaos.scenarios import Run

MOUNT_SIZE = "64m"  # room for 2,000 commands of audit lines (about 8 MB), quick to fill
MOUNT_DIR = "audit-disk"
FILLER = ".filler"
CHUNK = 64 * 1024


def _mount_dir(stack: Stack) -> Path:
    return stack.root / MOUNT_DIR


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)


def unmount(path: Path) -> None:
    """Unmount `path`; lazily (`umount -l`) when something still holds a file on it."""
    if not os.path.ismount(path):
        return
    if _run("umount", str(path)).returncode != 0:
        done = _run("umount", "-l", str(path))
        if done.returncode != 0:
            raise OSError(f"could not unmount {path}: {done.stderr.strip()}")


@contextlib.contextmanager
def audit_on_tmpfs(stack: Stack) -> Iterator[Path]:
    """Mount a small tmpfs under the stack's root and point the audit file and the witness of
    the workers and the producer there; unmounted on the way out, after a failure too."""
    mount = _mount_dir(stack)
    mount.mkdir(mode=0o700)
    done = _run("mount", "-t", "tmpfs", "-o", f"size={MOUNT_SIZE},mode=0700", "tmpfs", str(mount))
    if done.returncode != 0:
        raise OSError(f"could not mount a tmpfs on {mount}: {done.stderr.strip()}")
    before = os.environ.get("EXECQ_AUDIT_WITNESS")
    try:
        audit_log = mount / "audit.jsonl"
        witness = mount / "audit-witness.jsonl"
        stack.vars["EXECQ_AUDIT_LOG"] = str(audit_log)
        stack.vars["EXECQ_AUDIT_WITNESS"] = str(witness)
        # Settings has no witness field: the producer reads it from the environment
        # (load_audit_keys), so without this its checkpoints would go elsewhere
        os.environ["EXECQ_AUDIT_WITNESS"] = str(witness)
        stack.settings = stack.settings.model_copy(update={"audit_log": audit_log})
        yield mount
    finally:
        if before is None:
            os.environ.pop("EXECQ_AUDIT_WITNESS", None)
        else:
            os.environ["EXECQ_AUDIT_WITNESS"] = before
        unmount(mount)


def fill(path: Path) -> int:
    """Write `path` until the filesystem has no byte left; the bytes written."""
    written = 0
    block = b"\0" * CHUNK
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        size = CHUNK
        while size:
            try:
                n = os.write(fd, block[:size])
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                size //= 2  # the last pages: smaller writes take what is left
                continue
            written += n
    finally:
        os.close(fd)
    return written


def fill_audit_disk(run: Run) -> None:
    """At 30 % of the stream, fill the audit file's filesystem; full for 10 s (3 s short)."""
    run.at_fraction(0.3)
    full_s = 3.0 if run.opts.short else 10.0
    filler = _mount_dir(run.stack) / FILLER
    n = fill(filler)
    run.faults.note(f"audit disk full ({n} bytes of filler)")
    time.sleep(full_s)
    said = sum(w.output().count("could not be written ([Errno 28]") for w in run.stack.workers)
    run.faults.note(f"workers logged the full disk {said} time(s)")
    filler.unlink()
    run.faults.end = time.time()
    run.faults.note(f"audit disk has space again after {full_s} s")
