"""A stopping pool process does not keep the worker up 30 s after SIGTERM.

Found by `make chaos` (broker-tamper): in 1 warm shutdown out of 3, a pool process that had
just finished a command waited billiard's 30 s for the main process to read its result,
which a stopping main process no longer does; the worker outlived the 20 s it was given.
"""

from __future__ import annotations

import time
from multiprocessing import Value
from types import SimpleNamespace

import billiard.pool
import pytest

from workers.app import RESULTS_WAIT_S, bound_results_wait


@pytest.mark.timeout(15)
def test_a_result_nobody_reads_is_waited_for_briefly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(billiard.pool, "GUARANTEE_MESSAGE_CONSUMPTION_RETRY_LIMIT", 300)
    bound_results_wait()
    pool_process = SimpleNamespace(on_ready_counter=Value("i", 0))  # the main read nothing
    t0 = time.monotonic()
    consumed = billiard.pool.Worker._ensure_messages_consumed(pool_process, completed=1)
    waited = time.monotonic() - t0
    assert consumed is False
    assert waited < RESULTS_WAIT_S + 2, waited  # billiard's own wait is 30 s
