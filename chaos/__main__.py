"""`python -m chaos`: run the chaos scenarios against private servers, print a table per
scenario, exit 1 when any check failed (2 on bad usage or when --timeout ran out)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from chaos.checks import Report
from chaos.scenarios import SCENARIOS, Options, run_scenario

DEFAULT = list(SCENARIOS)
SHORT_COMMANDS = 150
COLUMNS = (
    "accepted",
    "completed",
    "worker_lost",
    "killed",
    "no_secrets",
    "lost",
    "duplicated",
    "leaked",
    "recover_s",
)


def table(reports: list[Report]) -> str:
    head = ["scenario", *COLUMNS, "result", "time_s"]
    rows = [head]
    for r in reports:
        values = [getattr(r, c) for c in COLUMNS]
        cells = ["-" if v is None else str(v) for v in values]
        rows.append([r.scenario, *cells, "ok" if r.passed else "FAIL", str(r.duration_s)])
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    return "\n".join(
        "  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in rows
    )


def parse(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m chaos", description=__doc__)
    ap.add_argument(
        "--scenarios",
        default=",".join(DEFAULT),
        help=f"comma-separated, of: {', '.join(SCENARIOS)}",
    )
    ap.add_argument("--commands", type=int, default=None, help="per scenario (default 2000)")
    ap.add_argument("--rate", type=float, default=60.0, help="submissions per second")
    ap.add_argument("--short", action="store_true", help="fewer commands, shorter faults")
    ap.add_argument("--timeout", type=float, default=3000.0, help="whole run, seconds")
    ap.add_argument("--json", action="store_true", help="print the reports as JSON")
    ap.add_argument("--out", type=Path, help="also write the JSON reports here")
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    # the producer warns on every submit while Redis is down: expected here, and the checks
    # judge the outcome; errors still show
    logging.getLogger("execq").setLevel(logging.ERROR)
    names = [n.strip() for n in args.scenarios.split(",") if n.strip()]
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown or not names:
        print(f"unknown scenario(s) {unknown}; known: {', '.join(SCENARIOS)}", file=sys.stderr)
        return 2
    commands = args.commands or (SHORT_COMMANDS if args.short else 2000)
    opts = Options(commands=commands, rate_per_s=args.rate, short=args.short, seed=args.seed)
    deadline = time.monotonic() + args.timeout
    reports: list[Report] = []
    timed_out = False
    for name in names:
        if time.monotonic() > deadline:
            timed_out = True
            break
        try:
            report = run_scenario(SCENARIOS[name], opts, deadline)
        except Exception as exc:  # a scenario that cannot run is a failed one; go on
            report = Report(name, problems=[f"could not run: {type(exc).__name__}: {exc}"])
        reports.append(report)
        if not args.json:
            print(f"{name}: {'ok' if report.passed else 'FAIL'} in {report.duration_s} s")
            for line in report.faults:
                print(f"  fault {line}")
            for line in report.problems[:20]:
                print(f"  PROBLEM {line}")
        if any(p.startswith("timeout") for p in report.problems):
            timed_out = True
    data = {
        "options": opts.__dict__,
        "timed_out": timed_out,
        "passed": not timed_out and all(r.passed for r in reports),
        "reports": [r.as_dict() for r in reports],
    }
    if args.out:
        args.out.write_text(json.dumps(data, indent=2, default=str) + "\n")
    if args.json:
        print(json.dumps(data, indent=2, default=str))
    else:
        print(table(reports))
    if timed_out:
        print(f"chaos: --timeout {args.timeout} s ran out", file=sys.stderr)
        return 2
    return 0 if data["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
