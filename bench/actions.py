"""`python -m bench.actions`: what an action costs at submit, next to a raw argv.

Two figures, medians of interleaved rounds in one process: the policy step alone (a raw
argv's check against filling an action and checking the result), and a whole
`Producer.submit` on a SQLite store with a local Redis (record, audit events, publish).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from producer import actions, policy
from producer.client import Producer
from producer.settings import Settings
from producer.spec import CommandSpec
from producer.store.db import make_engine
from producer.store.migrate import upgrade
from producer.tenants import TenantsFile, load_tenants

# Only compared with the action's root, never created or opened.
SCRATCH = "/tmp/bench"  # noqa: S108

TENANTS = """
tenants:
  bench:
    executables: [/bin/echo, /bin/rm, /bin/ls]
    env_allow: [LANG]
    deny_options:
      /bin/rm: [--recursive, -r, -R, --force, -f]
      /bin/ls: [--hide, -I]
    deny_args: ['^/$']
    actions:
      list:
        argv: [/bin/ls, -l, --sort=time, "--", "{path}"]
        params:
          path: {type: path, under: [/tmp]}
      greet:
        argv: [/bin/echo, "hello {name}", "{count}"]
        params:
          name: {type: string, pattern: "^[a-z ]{1,20}$"}
          count: {type: integer, minimum: 1, maximum: 5}
"""


def _median_us(fn: Callable[[int], object], n: int) -> float:
    started = time.perf_counter()
    for i in range(n):
        fn(i)
    return (time.perf_counter() - started) / n * 1e6


def _interleaved(
    cases: dict[str, Callable[[int], object]], n: int, rounds: int
) -> dict[str, float]:
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, fn in cases.items():
            samples[name].append(_median_us(fn, n))
    return {name: statistics.median(values) for name, values in samples.items()}


def policy_step(tenants: TenantsFile, n: int, rounds: int) -> dict[str, float]:
    """µs per spec: a raw argv's policy check; an action's fill + the same check."""
    tenant = tenants.tenants["bench"]
    raw = CommandSpec(tenant="bench", argv=["/bin/ls", "-l", "--sort=time", "--", SCRATCH])
    greet = CommandSpec(tenant="bench", action="greet", params={"name": "bob", "count": 2})
    listing = CommandSpec(tenant="bench", action="list", params={"path": SCRATCH})

    def check(spec: CommandSpec) -> Callable[[int], object]:
        return lambda _i: policy.check_tenant(actions.resolve(spec, tenant), tenant)

    return _interleaved(
        {
            "raw argv": check(raw),
            "action (string+int)": check(greet),
            "action (path)": check(listing),
        },
        n,
        rounds,
    )


def whole_submit(tenants: TenantsFile, redis_url: str, n: int, rounds: int) -> dict[str, float]:
    """µs per `Producer.submit` on SQLite with Redis: raw argv against an action."""
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{tmp}/bench.db"
        upgrade(make_engine(url))
        settings = Settings(
            database_url=url, broker_url=redis_url, audit_log=Path(tmp) / "audit.jsonl"
        )
        with Producer.from_settings(settings, tenants) as producer:
            cases = {
                "raw argv": lambda i: producer.submit(
                    CommandSpec(tenant="bench", argv=["/bin/echo", "hello bob", str(i % 5 + 1)])
                ),
                "action": lambda i: producer.submit(
                    CommandSpec(
                        tenant="bench", action="greet", params={"name": "bob", "count": i % 5 + 1}
                    )
                ),
            }
            return _interleaved(cases, n, rounds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-n", type=int, default=2000, help="specs per round (policy step)")
    parser.add_argument("--submits", type=int, default=200, help="submits per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/11")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tenants.yaml"
        path.write_text(TENANTS)
        tenants = load_tenants(path, env="dev")
    print("policy step at submit (µs per spec, median of interleaved rounds)")
    for name, us in policy_step(tenants, args.n, args.rounds).items():
        print(f"  {name:<22} {us:8.1f}")
    print("whole Producer.submit, SQLite store + Redis (µs per submit)")
    for name, us in whole_submit(tenants, args.redis_url, args.submits, args.rounds).items():
        print(f"  {name:<22} {us:8.1f}")


if __name__ == "__main__":
    main()
