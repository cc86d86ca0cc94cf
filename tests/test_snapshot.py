"""Snapshots: take, diff and restore on real files, including a command that tries to make
restore write through a symlink, and archives tampered with after they were stored."""

from __future__ import annotations

import io
import json
import os
import stat
import tarfile
from pathlib import Path

import pytest

from workers.snapshot import (
    MANIFEST,
    Diff,
    SnapshotError,
    SnapshotTooLarge,
    diff,
    restore,
    take,
)

MTIME_NS = 1_600_000_000_123_456_789


def tree(root: Path) -> dict[str, tuple[str, int, int, int, str]]:
    """Everything under `root` (kind, mode, uid, gid, content or link target), links unfollowed."""
    out: dict[str, tuple[str, int, int, int, str]] = {}
    for path in [root, *sorted(root.rglob("*"))]:
        st = path.lstat()
        if path.is_symlink():
            kind, value = "symlink", os.readlink(path)
        elif path.is_dir():
            kind, value = "dir", ""
        else:
            kind, value = "file", path.read_bytes().hex()
        out[str(path)] = (kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, value)
    return out


@pytest.fixture
def work(tmp_path: Path) -> Path:
    """A small tree a command declared, with a script, a link and a read-only directory."""
    root = tmp_path / "work"
    (root / "sub" / "deep").mkdir(parents=True)
    (root / "notes.txt").write_text("first\n")
    (root / "keep.txt").write_text("untouched\n")
    (root / "gone.txt").write_text("will be deleted\n")
    script = root / "run.sh"
    script.write_text("#!/bin/sh\necho hi\n")
    script.chmod(0o755)
    (root / "sub" / "a.txt").write_text("a\n")
    (root / "sub" / "deep" / "b.txt").write_text("b\n")
    (root / "link").symlink_to("notes.txt")
    ro = root / "ro"
    ro.mkdir()
    (ro / "inside.txt").write_text("in a read-only dir\n")
    ro.chmod(0o555)
    os.utime(root / "notes.txt", ns=(MTIME_NS, MTIME_NS))
    os.utime(root / "sub", ns=(MTIME_NS, MTIME_NS))
    return root


def test_diff_and_restore_undo_a_command(work: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious.txt").write_text("do not touch\n")
    before, outside_before = tree(work), tree(outside)
    snap = take([str(work)], max_bytes=1 << 20)
    assert snap.files == len(before)
    assert snap.bytes == sum(len(bytes.fromhex(v[4])) for v in before.values() if v[0] == "file")
    assert diff(snap.archive).empty

    # The command: edit, chmod, add, delete, and swap a directory for a link leading outside.
    (work / "notes.txt").write_text("second\n")
    (work / "run.sh").chmod(0o644)
    (work / "new.txt").write_text("new\n")
    (work / "newdir" / "x").mkdir(parents=True)
    (work / "newdir" / "x" / "y.txt").write_text("y\n")
    (work / "gone.txt").unlink()
    (work / "ro" / "inside.txt").unlink()
    (work / "link").unlink()
    (work / "link").symlink_to("/etc/passwd")
    for path in sorted((work / "sub").rglob("*"), reverse=True):
        path.rmdir() if path.is_dir() else path.unlink()
    (work / "sub").rmdir()
    (work / "sub").symlink_to(outside)

    found = diff(snap.archive)
    w = str(work)
    assert found.added == (f"{w}/new.txt", f"{w}/newdir", f"{w}/newdir/x", f"{w}/newdir/x/y.txt")
    assert found.changed == (f"{w}/link", f"{w}/notes.txt", f"{w}/run.sh", f"{w}/sub")
    assert found.removed == (
        f"{w}/gone.txt",
        f"{w}/ro/inside.txt",
        f"{w}/sub/a.txt",
        f"{w}/sub/deep",
        f"{w}/sub/deep/b.txt",
    )

    assert restore(snap.archive) == found
    assert tree(work) == before
    assert tree(outside) == outside_before  # nothing written through the link
    assert not (work / "sub").is_symlink()
    assert os.readlink(work / "link") == "notes.txt"
    assert (work / "notes.txt").lstat().st_mtime_ns == MTIME_NS
    assert (work / "sub").lstat().st_mtime_ns == MTIME_NS
    assert stat.S_IMODE((work / "ro").lstat().st_mode) == 0o555
    assert not [p for p in work.rglob("*") if ".restore-" in p.name]

    again = restore(snap.archive)
    assert again.empty
    assert tree(work) == before


def test_snapshot_is_deterministic(work: Path) -> None:
    assert take([str(work)], max_bytes=1 << 20) == take([str(work)], max_bytes=1 << 20)


def test_path_that_did_not_exist_is_removed(tmp_path: Path) -> None:
    missing_dir, missing_file = tmp_path / "later", tmp_path / "later.txt"
    snap = take([str(missing_dir), str(missing_file)], max_bytes=100)
    assert (snap.files, snap.bytes) == (0, 0)
    (missing_dir / "x").mkdir(parents=True)
    (missing_dir / "x" / "f").write_text("f")
    missing_file.symlink_to(missing_dir)
    assert diff(snap.archive).added == (
        str(missing_dir),
        str(missing_file),  # sorted as strings: "." comes before "/"
        f"{missing_dir}/x",
        f"{missing_dir}/x/f",
    )
    restore(snap.archive)
    assert not missing_dir.exists()
    assert not missing_file.is_symlink()
    assert restore(snap.archive).empty


def test_single_file_root(tmp_path: Path) -> None:
    config = tmp_path / "app.conf"
    config.write_text("port=80\n")
    config.chmod(0o640)
    snap = take([str(config) + "/"], max_bytes=100)  # a trailing slash is normalized away
    assert (snap.files, snap.bytes) == (1, 8)
    config.unlink()
    config.mkdir()  # replaced by a directory with content
    (config / "x").write_text("x")
    assert diff(snap.archive) == Diff(added=(f"{config}/x",), changed=(str(config),), removed=())
    restore(snap.archive)
    assert config.read_text() == "port=80\n"
    assert stat.S_IMODE(config.stat().st_mode) == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["app.conf"]


def test_root_that_is_a_symlink_stays_a_link(tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.mkdir()
    (target / "t.txt").write_text("t")
    link = tmp_path / "current"
    link.symlink_to(target)
    snap = take([str(link)], max_bytes=100)
    assert (snap.files, snap.bytes) == (1, 0)  # the link, not what it points to
    link.unlink()
    link.mkdir()
    restore(snap.archive)
    assert os.readlink(link) == str(target)
    assert (target / "t.txt").read_text() == "t"


def test_root_directory_replaced_by_a_link(work: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    before = tree(work)
    snap = take([str(work)], max_bytes=1 << 20)
    (work / "ro").chmod(0o755)
    moved = tmp_path / "moved"
    work.rename(moved)
    work.symlink_to(outside)
    assert diff(snap.archive).changed == (str(work),)
    restore(snap.archive)
    assert tree(work) == before
    assert list(outside.iterdir()) == []


def test_snapshot_below_a_file_is_a_path_that_did_not_exist(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("f")
    snap = take([str(tmp_path / "file" / "child")], max_bytes=100)
    assert snap.files == 0
    assert restore(snap.archive).empty


def test_nested_roots_are_covered_once(work: Path) -> None:
    snap = take([str(work / "sub"), str(work)], max_bytes=1 << 20)
    assert snap.files == len(tree(work))


def test_too_large(tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(b"x" * 60)
    (tmp_path / "b").write_bytes(b"y" * 60)
    with pytest.raises(SnapshotTooLarge, match=r"max_bytes=100: reached 120 bytes") as exc:
        take([str(tmp_path)], max_bytes=100)
    assert str(tmp_path / "b") in str(exc.value)
    assert take([str(tmp_path)], max_bytes=120).bytes == 120


@pytest.mark.parametrize("path", ["relative/path", "", "/a/../etc"])
def test_bad_paths(path: str) -> None:
    with pytest.raises(SnapshotError):
        take([path], max_bytes=100)


def test_fifo_is_refused(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe")
    with pytest.raises(SnapshotError, match=r"pipe: special file"):
        take([str(tmp_path)], max_bytes=100)


def build(manifest: object, members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, content in {MANIFEST: json.dumps(manifest).encode(), **members}.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    return buf.getvalue()


def genuine(tmp_path: Path) -> tuple[dict[str, object], dict[str, bytes]]:
    root = tmp_path / "root"
    root.mkdir()
    (root / "f").write_text("hello")
    members: dict[str, bytes] = {}
    with tarfile.open(fileobj=io.BytesIO(take([str(root)], max_bytes=100).archive)) as tar:
        for member in tar.getmembers():
            f = tar.extractfile(member)
            assert f is not None
            members[member.name] = f.read()
    return json.loads(members.pop(MANIFEST)), members


def entries(manifest: dict[str, object]) -> list[dict[str, object]]:
    found = manifest["entries"]
    assert isinstance(found, list)
    return found


def outside_root(m: dict[str, object], victim: str) -> None:
    entries(m)[1]["path"] = victim


def dotdot(m: dict[str, object], victim: str) -> None:
    root = entries(m)[0]["path"]
    entries(m)[1]["path"] = f"{root}/../{os.path.basename(victim)}"


def widened_root(m: dict[str, object], victim: str) -> None:
    m["roots"] = [{"path": os.path.dirname(victim), "existed": True}]
    entries(m)[1]["path"] = victim


def unknown_kind(m: dict[str, object], victim: str) -> None:
    entries(m)[1]["kind"] = "fifo"


def bad_content(m: dict[str, object], victim: str) -> None:
    entries(m)[1]["sha256"] = "0" * 64


def no_version(m: dict[str, object], victim: str) -> None:
    del m["version"]


@pytest.mark.parametrize(
    "tamper", [outside_root, dotdot, widened_root, unknown_kind, bad_content, no_version]
)
def test_tampered_archive_writes_nothing(tmp_path: Path, tamper: object) -> None:
    manifest, members = genuine(tmp_path)
    root = tmp_path / "root"
    (root / "f").unlink()
    (root / "added").write_text("added")
    victim = tmp_path / "victim.txt"
    assert callable(tamper)
    tamper(manifest, str(victim))
    archive = build(manifest, members)
    with pytest.raises(SnapshotError):
        diff(archive)
    with pytest.raises(SnapshotError):
        restore(archive)
    assert not victim.exists()
    assert sorted(p.name for p in root.iterdir()) == ["added"]  # nothing removed either


@pytest.mark.parametrize("archive", [b"", b"not a tar at all" * 100, build([], {})])
def test_garbage_archive(archive: bytes) -> None:
    with pytest.raises(SnapshotError):
        restore(archive)


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can give files away")
def test_owner_and_setuid_restored_as_root(tmp_path: Path) -> None:
    root = tmp_path / "owned"
    root.mkdir()
    tool = root / "tool"
    tool.write_text("#!/bin/sh\n")
    os.chown(tool, 1234, 1234)
    tool.chmod(0o4755)  # after chown, which would clear it
    (root / "link").symlink_to("tool")
    os.chown(root / "link", 1234, 1234, follow_symlinks=False)
    plain = root / "plain"
    plain.write_text("p")
    before = tree(root)
    snap = take([str(root)], max_bytes=100)

    os.chown(tool, 0, 0)  # clears setuid
    os.chown(root / "link", 0, 0, follow_symlinks=False)
    os.chown(plain, 1234, 1234)
    os.chown(root, 1234, 1234)
    assert diff(snap.archive).changed == tuple(str(p) for p in (root, root / "link", plain, tool))

    restore(snap.archive)
    assert tree(root) == before
    assert (tool.stat().st_uid, tool.stat().st_gid) == (1234, 1234)
    assert stat.S_IMODE(tool.stat().st_mode) == 0o4755
    assert (plain.stat().st_uid, root.stat().st_gid) == (0, 0)
    assert restore(snap.archive).empty


def test_summary_shape_and_limit() -> None:
    d = Diff(added=("/a", "/b", "/c"), changed=("/d",), removed=())
    assert d.summary(limit=2) == {
        "added": 3,
        "changed": 1,
        "removed": 0,
        "paths": {"added": ["/a", "/b"], "changed": ["/d"], "removed": []},
    }
    assert json.loads(json.dumps(d.summary())) == d.summary()
    assert not d.empty
    assert Diff((), (), ()).empty
