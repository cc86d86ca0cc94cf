"""Snapshots of the paths a command declared, so that a rollback can put them back exactly.

The archive is an uncompressed tar: `manifest.json` (roots, whether each existed, and every
entry's path, kind, mode, owner, size, sha256, link target, mtime) and `data/<index>` per file.
It is read back as untrusted: only manifest paths, checked to lie under a manifest root, decide
where anything is written, and all content is checked against its sha256 before the first
write. Restore never writes through a symlink (directories are lstat-ed from the root down; a
link where a directory must be is removed, not followed), and files and links are built under
a temporary name beside their path and renamed into place, so no one sees half a file.
Hard links come back as separate files.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import secrets
import shutil
import stat
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, replace

VERSION = 1
MANIFEST = "manifest.json"
_KINDS = {stat.S_IFREG: "file", stat.S_IFDIR: "dir", stat.S_IFLNK: "symlink"}
_HEX = frozenset("0123456789abcdef")


class SnapshotError(Exception):
    """A snapshot cannot be taken or restored; the message names the path and why."""


class SnapshotTooLarge(SnapshotError):
    """The files under the snapshot paths hold more content than the caller allows."""


@dataclass(frozen=True)
class Diff:
    """Absolute paths that differ between a snapshot and the disk, each tuple sorted."""

    added: tuple[str, ...]
    changed: tuple[str, ...]
    removed: tuple[str, ...]

    @property
    def empty(self) -> bool:
        """True when the disk matches the snapshot."""
        return not (self.added or self.changed or self.removed)

    def summary(self, limit: int = 20) -> dict[str, object]:
        """Counts, and the first `limit` paths of each group; ready for JSON."""
        groups = {"added": self.added, "changed": self.changed, "removed": self.removed}
        out: dict[str, object] = {name: len(paths) for name, paths in groups.items()}
        out["paths"] = {name: list(paths[:limit]) for name, paths in groups.items()}
        return out


@dataclass(frozen=True)
class Snapshot:
    """An archive for the caller to store, and what it holds."""

    archive: bytes
    files: int  # entries archived: files, directories and symlinks
    bytes: int  # regular-file content


@dataclass(frozen=True)
class _Entry:
    path: str
    kind: str
    mode: int
    uid: int
    gid: int
    size: int
    mtime_ns: int
    sha256: str = ""
    target: str = ""


@dataclass(frozen=True)
class _Loaded:
    roots: dict[str, bool]  # root -> existed when the snapshot was taken
    entries: list[_Entry]  # parents before children
    data: dict[str, bytes]  # file path -> content, already checked against its sha256


def take(paths: Sequence[str], *, max_bytes: int) -> Snapshot:
    """Archive `paths` (absolute). Raises SnapshotTooLarge when file content exceeds max_bytes
    (message names the limit and the size reached), SnapshotError for a relative path, a
    special file (device, fifo, socket), or an unreadable file."""
    roots, buf, total = _roots(paths), io.BytesIO(), 0
    existed: dict[str, bool] = {}
    entries: list[dict[str, object]] = []
    try:
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for root in roots:
                existed[root] = False
                for path, st in _walk(root):
                    existed[root], entry = True, _entry(path, st)
                    if entry.kind != "file":
                        entries.append(asdict(entry))
                        continue
                    # Checked before reading too, so a huge file is never loaded to be refused.
                    content, reached = b"", total + entry.size
                    if reached <= max_bytes:
                        content = _read(path, max_bytes - total)
                        reached = total + len(content)  # it may have grown since lstat
                    if reached > max_bytes:
                        raise SnapshotTooLarge(
                            f"snapshot exceeds max_bytes={max_bytes}: reached {reached}"
                            f" bytes of file content at {path}"
                        )
                    total, digest = reached, hashlib.sha256(content).hexdigest()
                    _add(tar, f"data/{len(entries)}", content)
                    entries.append(asdict(replace(entry, size=len(content), sha256=digest)))
            roots_out = [{"path": root, "existed": existed[root]} for root in roots]
            manifest = {"version": VERSION, "roots": roots_out, "entries": entries}
            _add(tar, MANIFEST, json.dumps(manifest, sort_keys=True).encode())
    except OSError as exc:
        raise SnapshotError(f"{exc.filename}: cannot snapshot: {exc.strerror}") from exc
    return Snapshot(archive=buf.getvalue(), files=len(entries), bytes=total)


def diff(archive: bytes) -> Diff:
    """What changed on disk since the snapshot (read-only)."""
    return _diff(_load(archive))


def restore(archive: bytes) -> Diff:
    """Put every snapshot path back exactly as archived; returns the Diff it undid (computed
    before restoring)."""
    snap = _load(archive)
    undone = _diff(snap)
    for root, existed in snap.roots.items():
        # Above a root is the deployment's layout, not the command's: it is not recreated.
        if existed and not os.path.isdir(os.path.dirname(root)):
            raise SnapshotError(f"{root}: parent directory is gone; cannot restore")
    stale, names = {*undone.changed, *undone.removed}, {e.path for e in snap.entries}
    try:
        for root in (root for root, existed in snap.roots.items() if not existed):
            _remove(root)
        for entry in snap.entries:
            _parents_real(entry.path, next(r for r in snap.roots if _under(entry.path, r)))
            if entry.kind == "dir":
                _make_dir(entry.path, names)
            elif entry.path in stale:
                _replace(entry, snap.data.get(entry.path, b""))
            else:
                os.utime(entry.path, ns=(entry.mtime_ns, entry.mtime_ns), follow_symlinks=False)
        # Deepest first and after their content: adding a child changes a directory's mtime,
        # and a read-only directory must take its files before it gets its mode back.
        for entry in reversed(snap.entries):
            if entry.kind == "dir":
                fd = os.open(entry.path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
                try:
                    _set_meta(fd, entry)
                finally:
                    os.close(fd)
    except OSError as exc:
        raise SnapshotError(f"{exc.filename}: cannot restore: {exc.strerror}") from exc
    return undone


def _roots(paths: Sequence[str]) -> list[str]:
    """Normalized roots, sorted; a root inside another one is already covered by it."""
    clean: set[str] = set()
    for path in paths:
        if not isinstance(path, str) or not os.path.isabs(path) or ".." in path.split("/"):
            raise SnapshotError(f"{path!r}: snapshot paths must be absolute, without '..'")
        clean.add(_checked(os.path.normpath("/" + path.lstrip("/")), "snapshot path"))
    kept: list[str] = []
    for path in sorted(clean):
        if not any(_under(path, root) for root in kept):
            kept.append(path)
    return kept


def _checked(path: object, what: str) -> str:
    if not isinstance(path, str) or path == "/" or "\0" in path or path.startswith("//"):
        raise SnapshotError(f"{what} {path!r}: not a normalized absolute path below /")
    if not path.startswith("/") or os.path.normpath(path) != path:  # also catches '.', '..'
        raise SnapshotError(f"{what} {path!r}: not a normalized absolute path below /")
    return path


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root + "/")


def _walk(root: str) -> Iterator[tuple[str, os.stat_result]]:
    """`root` and everything under it, parents first, names sorted; links are not followed."""
    try:
        st = os.lstat(root)
    except (FileNotFoundError, NotADirectoryError):
        return
    yield root, st
    if stat.S_ISDIR(st.st_mode):
        try:
            names = sorted(os.listdir(root))
        except OSError as exc:
            raise SnapshotError(f"{root}: cannot list directory: {exc.strerror}") from exc
        for name in names:
            yield from _walk(os.path.join(root, name))


def _entry(path: str, st: os.stat_result) -> _Entry:
    kind = _KINDS.get(stat.S_IFMT(st.st_mode))
    if kind is None:
        raise SnapshotError(f"{path}: special file (device, fifo or socket) cannot be archived")
    target = os.readlink(path) if kind == "symlink" else ""
    size = st.st_size if kind == "file" else 0
    mode = stat.S_IMODE(st.st_mode)
    return _Entry(path, kind, mode, st.st_uid, st.st_gid, size, st.st_mtime_ns, target=target)


def _read(path: str, limit: int) -> bytes:
    """At most `limit` + 1 bytes; refuses a link or special file swapped in since lstat."""
    try:
        # O_NONBLOCK: a fifo swapped in must not hang the open.
        with open(os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK), "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise SnapshotError(f"{path}: no longer a regular file")
            return f.read(limit + 1)
    except OSError as exc:
        raise SnapshotError(f"{path}: cannot read: {exc.strerror}") from exc


def _add(tar: tarfile.TarFile, name: str, content: bytes) -> None:
    info = tarfile.TarInfo(name)  # mtime and owner stay 0: the same tree gives the same bytes
    info.size = len(content)
    tar.addfile(info, io.BytesIO(content))


def _load(archive: bytes) -> _Loaded:
    """Parse and validate an archive completely, before anything is written."""
    try:
        with tarfile.open(fileobj=io.BytesIO(archive), mode="r:") as tar:
            raw = json.loads(_member(tar, MANIFEST))
            if not isinstance(raw, dict) or raw.get("version") != VERSION:
                raise SnapshotError("snapshot manifest: missing or unknown version")
            roots: dict[str, bool] = {}
            for item in raw["roots"]:
                root = _checked(item["path"], "manifest root")
                if not isinstance(item["existed"], bool) or any(
                    _under(root, r) or _under(r, root) for r in roots
                ):
                    raise SnapshotError(f"manifest root {root}: duplicate, nested or malformed")
                roots[root] = item["existed"]
            entries = [_Entry(**item) for item in raw["entries"]]
            kinds: dict[str, str] = {}
            for entry in entries:
                _check_entry(entry, roots, kinds)
                kinds[entry.path] = entry.kind
            if any(existed != (root in kinds) for root, existed in roots.items()):
                raise SnapshotError("snapshot manifest: a root's entry does not match 'existed'")
            data: dict[str, bytes] = {}
            for index, entry in enumerate(entries):
                if entry.kind == "file":
                    data[entry.path] = _member(tar, f"data/{index}")
                    if hashlib.sha256(data[entry.path]).hexdigest() != entry.sha256:
                        raise SnapshotError(f"{entry.path}: archived content fails its sha256")
    except (tarfile.TarError, ValueError, KeyError, TypeError) as exc:
        raise SnapshotError(f"snapshot archive is malformed: {exc!r}") from exc
    return _Loaded(roots, entries, data)


def _member(tar: tarfile.TarFile, name: str) -> bytes:
    f = tar.extractfile(name)
    if f is None:
        raise SnapshotError(f"snapshot archive: member {name} is not a regular file")
    return f.read()


def _check_entry(entry: _Entry, roots: dict[str, bool], kinds: dict[str, str]) -> None:
    path = _checked(entry.path, "manifest entry")
    numbers = (entry.mode, entry.uid, entry.gid, entry.size, entry.mtime_ns)
    ok = (
        entry.kind in _KINDS.values()
        and path not in kinds
        and all(type(n) is int for n in numbers)
        and 0 <= entry.mode <= 0o7777
        and min(entry.uid, entry.gid, entry.size) >= 0
        and isinstance(entry.sha256, str)
        and isinstance(entry.target, str)
        and (entry.kind != "file" or (len(entry.sha256) == 64 and set(entry.sha256) <= _HEX))
        and (entry.kind != "symlink" or (entry.target != "" and "\0" not in entry.target))
        # A root, or the child of a directory already accepted: so always under a root.
        and (roots.get(path) is True or kinds.get(os.path.dirname(path)) == "dir")
    )
    if not ok:
        raise SnapshotError(f"manifest entry {path}: malformed, duplicate or outside the roots")


def _diff(snap: _Loaded) -> Diff:
    want = {entry.path: entry for entry in snap.entries}
    have = {path: st for root in snap.roots for path, st in _walk(root)}
    changed = [p for p in want.keys() & have.keys() if not _same(want[p], p, have[p])]
    return Diff(
        added=tuple(sorted(have.keys() - want.keys())),
        changed=tuple(sorted(changed)),
        removed=tuple(sorted(want.keys() - have.keys())),
    )


def _same(entry: _Entry, path: str, st: os.stat_result) -> bool:
    meta = (_KINDS.get(stat.S_IFMT(st.st_mode)), stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid)
    if meta != (entry.kind, entry.mode, entry.uid, entry.gid):
        return False
    try:
        if entry.kind == "symlink":
            return os.readlink(path) == entry.target
        if entry.kind == "file":  # always hashed: sizes are capped, and mtimes can be forged
            same_size = st.st_size == entry.size
            return same_size and hashlib.sha256(_read(path, entry.size)).hexdigest() == entry.sha256
    except (OSError, SnapshotError):
        return False  # unreadable now: it cannot be shown to be the same
    return True


def _lstat(path: str) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None


def _remove(path: str) -> None:
    """Remove whatever is at `path`; rmtree only on a real directory, never through a link."""
    st = _lstat(path)
    if st is not None and stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path)
    elif st is not None:
        os.unlink(path)


def _parents_real(path: str, root: str) -> None:
    parent = os.path.dirname(path)
    while _under(parent, root):
        if not stat.S_ISDIR(os.lstat(parent).st_mode):
            raise SnapshotError(f"{parent}: not a real directory; refusing to write through it")
        parent = os.path.dirname(parent)


def _make_dir(path: str, names: set[str]) -> None:
    st = _lstat(path)
    if st is not None and not stat.S_ISDIR(st.st_mode):
        os.unlink(path)  # e.g. a symlink to /etc where a directory was: the link goes, not /etc
        st = None
    if st is None:
        os.mkdir(path, 0o700)  # its own mode comes last, after its content
    elif stat.S_IMODE(st.st_mode) & 0o700 != 0o700:
        os.chmod(path, stat.S_IMODE(st.st_mode) | 0o700)  # so a non-root worker can fill it
    for name in os.listdir(path):
        if os.path.join(path, name) not in names:
            _remove(os.path.join(path, name))


def _may_chown(entry: _Entry) -> bool:
    """Only root may give a file away. A non-root worker asking would get EPERM halfway through
    a restore, and what it writes is already its own: the owner is then left as it is."""
    return os.geteuid() == 0 or (entry.uid, entry.gid) == (os.geteuid(), os.getegid())


def _set_meta(fd: int, entry: _Entry) -> None:
    if _may_chown(entry):
        os.fchown(fd, entry.uid, entry.gid)
    os.fchmod(fd, entry.mode)  # after chown, which clears setuid and setgid
    os.utime(fd, ns=(entry.mtime_ns, entry.mtime_ns))


def _replace(entry: _Entry, content: bytes) -> None:
    if (st := _lstat(entry.path)) is not None and stat.S_ISDIR(st.st_mode):
        shutil.rmtree(entry.path)  # rename cannot put a file or link over a directory
    parent, name = os.path.split(entry.path)
    tmp = os.path.join(parent, f".{name}.restore-{secrets.token_hex(6)}")
    try:
        if entry.kind == "symlink":
            os.symlink(entry.target, tmp)
            if _may_chown(entry):
                os.chown(tmp, entry.uid, entry.gid, follow_symlinks=False)
            os.utime(tmp, ns=(entry.mtime_ns, entry.mtime_ns), follow_symlinks=False)
        else:
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
            with open(os.open(tmp, flags, 0o600), "wb") as f:
                f.write(content)
                f.flush()
                _set_meta(f.fileno(), entry)
        os.replace(tmp, entry.path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
