"""The JSON-lines audit file: one chain across rotations, tamper-evident, shared by processes."""

from __future__ import annotations

import itertools
import json
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import pytest

from producer.audit.events import GENESIS, Outcome, Phase, Subject, make_event
from producer.audit.sinks import JsonlSink, MemorySink, series, verify_file
from producer.audit.verify import verify_events
from producer.spec import cmd_hash

ROOT = Path(__file__).resolve().parent.parent


def events(n: int, *, tenant: str = "alpha", tag: str = "x") -> list:
    s = Subject(f"cmd-{tag}", tenant, "alice", cmd_hash(["/bin/true"]), None)
    phases = [Phase.PARSE, Phase.AUTHZ, Phase.BIND, Phase.EXECUTE, Phase.ARCHIVE]
    return [make_event(s, phases[i % 5], Outcome.OK, actor=tag, detail={"i": i}) for i in range(n)]


def lines(path: Path) -> list[dict]:
    return [json.loads(raw) for raw in path.read_text().splitlines() if raw.strip()]


def write_lines(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_appends_form_one_chain_from_the_genesis(tmp_path: Path) -> None:
    sink = JsonlSink(tmp_path / "audit.jsonl")
    sink.append(events(3))
    sink.append(events(2))
    rows = lines(tmp_path / "audit.jsonl")
    assert [r["seq"] for r in rows] == [1, 2, 3, 4, 5]
    assert rows[0]["prev_hash"] == GENESIS
    assert all(b["prev_hash"] == a["hash"] for a, b in itertools.pairwise(rows))
    for field in ("event_id", "command_id", "tenant", "principal", "phase", "outcome"):
        assert rows[0][field]
    assert len(rows[0]["cmd_hash"]) == 64
    report = verify_file(tmp_path / "audit.jsonl")
    assert report.ok and report.events == 5


def test_rotation_keeps_n_files_and_verify_follows_the_series(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    sink = JsonlSink(path, max_bytes=3000, keep=3)
    for i in range(40):
        sink.append(events(2, tag=f"t{i}"))
    files = series(path)
    assert [f.name for f in files] == [
        "audit.jsonl.3",
        "audit.jsonl.2",
        "audit.jsonl.1",
        "audit.jsonl",
    ]
    assert all(f.stat().st_size <= 3000 for f in files)
    report = verify_file(path)
    assert report.ok, report.problem
    # The oldest kept file continues a chain whose beginning was rotated away.
    summary = report.chains["file"]
    assert summary.first_seq > 1 and summary.anchor is not None
    assert summary.last_seq == 80


@pytest.mark.parametrize("kind", ["edit", "delete", "insert", "reorder", "renumber"])
def test_tampering_with_the_file_is_found_and_named(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "audit.jsonl"
    JsonlSink(path).append(events(6))
    rows = lines(path)
    target = rows[2]
    if kind == "edit":
        rows[2] = {**target, "outcome": "refused"}
    elif kind == "delete":
        del rows[2]
    elif kind == "insert":
        forged = make_event(
            Subject("cmd-x", "alpha", "eve", cmd_hash([]), None),
            Phase.OVERRIDE,
            Outcome.OK,
            actor="eve",
        ).linked("file", 3, rows[1]["hash"])
        rows.insert(2, forged.to_json())
    elif kind == "reorder":
        rows[2], rows[3] = rows[3], rows[2]
    else:
        rows[2] = {**target, "seq": 30}
    write_lines(path, rows)
    report = verify_file(path)
    assert not report.ok
    problem = report.problem
    assert problem is not None
    assert problem.where.endswith(":3") or problem.where.endswith(":4"), problem
    assert problem.event_id in {r["event_id"] for r in rows}


def test_a_lone_file_missing_its_first_events_is_tampered(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    JsonlSink(path).append(events(4))
    write_lines(path, lines(path)[2:])
    report = verify_file(path)
    assert not report.ok and "deleted" in str(report.problem)
    # An export that starts mid-way is accepted when asked for.
    assert verify_file(path, allow_anchor=True).ok


def test_a_torn_last_line_is_reported_and_later_appends_stay_on_their_own_lines(
    tmp_path: Path,
) -> None:
    path = tmp_path / "audit.jsonl"
    sink = JsonlSink(path)
    sink.append(events(2))
    with path.open("a") as f:
        f.write('{"event_id": "torn')  # a crash mid-write
    sink.append(events(1, tag="after"))
    raw = path.read_text().splitlines()
    assert raw[2] == '{"event_id": "torn'
    assert json.loads(raw[3])["seq"] == 3  # still links to the last complete event
    report = verify_file(path)
    assert not report.ok and report.problem is not None
    assert report.problem.where.endswith(":3")


def _append_from_process(path: str, tag: str, n: int) -> None:
    sink = JsonlSink(Path(path), max_bytes=20_000, keep=50)
    for i in range(n):
        sink.append(events(3, tag=f"{tag}-{i}"))


def test_many_processes_appending_keep_one_valid_chain_across_rotations(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    ctx = multiprocessing.get_context("fork")
    procs = [
        ctx.Process(target=_append_from_process, args=(str(path), f"p{k}", 60)) for k in range(6)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    report = verify_file(path)
    assert report.ok, report.problem
    assert report.events == 6 * 60 * 3
    assert len(series(path)) > 3


def test_the_memory_sink_chains_per_tenant_and_verifies() -> None:
    sink = MemorySink()
    sink.append(events(3, tenant="alpha"))
    sink.append(events(2, tenant="beta"))
    report = verify_events(((e, "memory") for e in sink.events), "memory")
    assert report.ok
    assert {c: s.last_seq for c, s in report.chains.items()} == {"alpha": 3, "beta": 2}


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "workers.cli", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        timeout=60,
        check=False,
    )


def test_cli_verify_file_exits_0_when_intact_and_1_naming_the_bad_event(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    JsonlSink(path).append(events(5))
    ok = _cli("audit", "verify", "--file", str(path), "--json")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["events"] == 5
    rows = lines(path)
    rows[3]["reason"] = "rewritten"
    write_lines(path, rows)
    bad = _cli("audit", "verify", "--file", str(path))
    assert bad.returncode == 1
    assert rows[3]["event_id"] in bad.stdout and "altered" in bad.stdout
    missing = _cli("audit", "verify", "--file", str(tmp_path / "nope.jsonl"))
    assert missing.returncode == 2 and "no audit file" in missing.stderr


def test_an_append_after_a_long_event_links_to_it(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    sink = JsonlSink(path)
    sink.append(events(2))
    s = Subject("cmd-long", "alpha", "alice", cmd_hash(["/bin/true"]), None)
    sink.append([make_event(s, Phase.ABORT, Outcome.FAILED, actor="w", reason="x" * 50_000)])
    sink.append(events(1, tag="after"))
    rows = lines(path)
    assert [r["seq"] for r in rows] == [1, 2, 3, 4]
    assert verify_file(path).ok


def test_writers_taking_turns_each_link_to_the_other_s_last_event(tmp_path: Path) -> None:
    # Each sink remembers its own last append; another writer's append in between must be
    # noticed (the file changed) and linked to, never skipped.
    path = tmp_path / "audit.jsonl"
    first, second = JsonlSink(path), JsonlSink(path)
    for i in range(4):
        first.append(events(2, tag=f"a{i}"))
        first.append(events(1, tag=f"b{i}"))
        second.append(events(2, tag=f"c{i}"))
    rows = lines(path)
    assert [r["seq"] for r in rows] == list(range(1, 21))
    assert all(b["prev_hash"] == a["hash"] for a, b in itertools.pairwise(rows))
    assert verify_file(path).ok
