"""`python -m chaos.soak`: a long run of mixed commands against private Redis and PostgreSQL
servers, sampling what a leak would show in; slopes after the warm-up must be flat, every
command must end as its kind says, nothing may be left behind. Exit 1 when a check failed,
2 on bad usage or when --timeout ran out."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from chaos.checks import Report, check_audit, check_leaks, wait_settled
from chaos.servers import PgCluster, RedisServer
from chaos.soak_charts import draw
from chaos.soak_load import MIX, SoakLoad, prime, tenants_yaml
from chaos.soak_outcome import check_outcomes, wait_batches
from chaos.soak_report import finished_rate, judge, markdown, problems
from chaos.soak_sample import Sampler
from chaos.stack import Stack
from producer.store.db import make_engine

# Each pool process opens some connections on its first command of a kind, and the rarest
# kinds are 1 in 100: a warm-up shorter than this many submissions may judge that as growth.
WARM_SUBMISSIONS = 1000


def warmup_seconds(text: str, duration_s: float) -> float:
    """`20%` of the run, `90s`, or minutes (`2`, `2m`)."""
    text = text.strip().lower()
    if text.endswith("%"):
        return duration_s * float(text[:-1]) / 100
    if text.endswith("s"):
        return float(text[:-1])
    return float(text.removesuffix("m")) * 60


def parse(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m chaos.soak", description=__doc__)
    ap.add_argument("--minutes", type=float, default=30.0, help="how long to submit")
    ap.add_argument("--rate", type=float, default=100.0, help="submissions per second")
    ap.add_argument("--interval", type=float, default=10.0, help="seconds between samples")
    ap.add_argument("--warmup", default="20%", help="not judged: 20%%, 90s or minutes")
    ap.add_argument("--workers", type=int, default=2, help="execq worker processes")
    ap.add_argument("--concurrency", type=int, default=3, help="pool processes per worker")
    ap.add_argument("--out", type=Path, help="write the result as JSON here")
    ap.add_argument("--charts", type=Path, default=Path("docs/img"), help="PNG directory")
    ap.add_argument("--no-charts", action="store_true")
    ap.add_argument("--json", action="store_true", help="print the result as JSON")
    ap.add_argument("--timeout", type=float, default=None, help="whole run, seconds")
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args(argv)


def run(args: argparse.Namespace, deadline: float) -> dict[str, Any]:
    """Servers, workers, the load with the sampler, the checks; everything torn down."""
    duration_s = args.minutes * 60
    warmup_s = warmup_seconds(args.warmup, duration_s)
    end = Report("soak")
    with RedisServer() as rds, PgCluster() as pg:
        stack = Stack(rds.url, pg.url, tenants_text=tenants_yaml(args.concurrency))
        # a TMPDIR of the stack's own: entries other runs on the host leave in /tmp stay out
        (stack.root / "tmp").mkdir()
        stack.vars["TMPDIR"] = str(stack.root / "tmp")
        engine = make_engine(pg.url)
        try:
            stack.upgrade()
            for _ in range(args.workers):
                stack.start_worker()
            with stack.producer() as producer, stack.producer() as revoker:
                primed = prime(producer, args.workers * args.concurrency)
                load = SoakLoad(producer, revoker, args.rate, duration_s, args.seed)
                sampler = Sampler(
                    stack,
                    rds,
                    args.interval,
                    lambda: {"submitted": load.submitted, "submit_lag_s": round(load.lag_s, 2)},
                )
                sampler.start()
                load.start()
                if not load.join(max(0.0, deadline - time.monotonic())):
                    end.problems.append("timeout: the load was still submitting")
                sampler.phase = "settle"
                # a backlog is drained, however long it takes within --timeout: how long it
                # took says how far behind the workers were
                load_end = time.monotonic()
                left = wait_settled(engine, deadline) or wait_batches(engine, deadline)
                drain_s = round(time.monotonic() - load_end, 1)
                if left:
                    end.problems.append(f"timeout: {left} command(s) or batch(es) unsettled")
                sampler.samples.append(sampler.sample())  # the settled state, last point
                sampler.stop()
            outcomes = check_outcomes(engine, load.sent())
            stack.stop_live()
            check_leaks(end, stack, rds)
            left_tmp = sorted(p.name for p in (stack.root / "tmp").iterdir())
            end.problems.extend(f"leaked temporary entry {n}" for n in left_tmp)
            check_audit(end, stack)
        finally:
            engine.dispose()
            stack.close()
    result = _result(args, warmup_s, load, sampler, outcomes, end)
    result.update(drain_s=drain_s, primed=primed, warnings=[])
    if (covered := warmup_s * result["achieved_rate"]) < WARM_SUBMISSIONS:
        result["warnings"].append(
            f"the warm-up covers {covered:.0f} submissions: the rarest kinds may not have "
            "reached every pool process yet, whose first ones open connections for good"
        )
    return result


def _result(
    args: argparse.Namespace,
    warmup_s: float,
    load: SoakLoad,
    sampler: Sampler,
    outcomes: Any,
    end: Report,
) -> dict[str, Any]:
    verdicts = judge(sampler.samples, warmup_s)
    loads = [s["host_load1"] for s in sampler.samples if s.get("phase") == "load"]
    elapsed = max(1e-9, load.ended_at - load.started_at)
    found = [*outcomes.problems, *problems(verdicts), *end.problems]
    if outcomes.unsettled:
        found.append(f"{outcomes.unsettled} command(s) not terminal")
    return {
        "minutes": args.minutes,
        "rate": args.rate,
        "workers": args.workers,
        "concurrency": args.concurrency,
        "mix": MIX,
        "warmup_s": warmup_s,
        "submitted": load.accepted,
        "achieved_rate": round(load.accepted / elapsed, 1),
        "finished_rate": finished_rate(sampler.samples),
        "host_load1": round(sum(loads) / len(loads), 1) if loads else None,
        "submit_errors": dict(load.errors),
        "revoke_errors": dict(load.revoke_errors),
        "outcomes": outcomes.as_dict(),
        "verdicts": verdicts,
        "leaked": end.leaked,
        "sample_errors": sampler.errors,
        "samples": sampler.samples,
        "problems": found,
        "passed": not found,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    logging.getLogger("execq").setLevel(logging.ERROR)  # the checks judge; errors still show
    if args.minutes <= 0 or args.rate <= 0 or args.interval <= 0:
        print("--minutes, --rate and --interval must be positive", file=sys.stderr)
        return 2
    try:
        warmup_seconds(args.warmup, 60.0)
    except ValueError:
        print(f"--warmup {args.warmup!r}: a share (20%), seconds (90s) or minutes", file=sys.stderr)
        return 2
    # room to drain a backlog as long again as the load, and to set up and check
    timeout = args.timeout if args.timeout is not None else args.minutes * 120 + 600
    started = time.monotonic()
    result = run(args, started + timeout)
    result["duration_s"] = round(time.monotonic() - started, 1)
    if not args.no_charts and len(result["samples"]) > 1:
        title = (
            f"execq soak: {args.minutes:g} min, {args.rate:g} submissions/s asked, "
            f"{result['achieved_rate']:g}/s achieved"
        )
        result["charts"] = [
            str(p) for p in draw(result["samples"], result["warmup_s"], args.charts, title)
        ]
    if args.out:
        args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    else:
        print(markdown(result))
        for line in result["warnings"]:
            print(f"WARNING {line}")
        for line in result["problems"]:
            print(f"PROBLEM {line}")
        print(f"soak: {'ok' if result['passed'] else 'FAIL'} in {result['duration_s']} s")
    if any(p.startswith("timeout") for p in result["problems"]):
        print(f"soak: --timeout {timeout:g} s ran out", file=sys.stderr)
        return 2
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
