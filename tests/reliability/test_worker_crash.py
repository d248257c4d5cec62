"""Promises 2, 4 and 5 under SIGKILL: the worker is killed at random moments while
thousands of mixed commands flow, restarted, and the log, the results and the read
models are then checked."""

from __future__ import annotations

import random
import time
from collections import Counter
from typing import Any

import pytest

from app.client import CommandClient
from app.local.worker import WorkerProcess
from app.settings import Settings
from app.soak import Workload
from tests.invariants import (
    assert_read_models_match_the_log,
    assert_write_side_promises,
)

ACCOUNTS = 40
COMMANDS = 2400
KILLS = 4


def _workload(seed: int, count: int = COMMANDS) -> list[tuple[str, Any]]:
    """The soak's mixed workload: ledger deposits and withdrawals, card-paid orders
    through their lifecycle, and account-paid orders that the saga charges; some
    are refused on purpose (overdrafts, shipping unpaid orders)."""
    workload = Workload(random.Random(seed), accounts=ACCOUNTS)
    work: list[tuple[str, Any]] = [
        (f"open-{n}", command) for n, command in enumerate(workload.opening())
    ]
    work += [(f"cmd-{n}", workload.next()) for n in range(count - len(work))]
    return work


@pytest.mark.slow
def test_sigkill_under_load_keeps_every_promise(deployment: Settings) -> None:
    rng = random.Random(7)
    work = _workload(seed=11)
    worker = WorkerProcess(deployment)
    worker.start(timeout=120)
    try:
        with CommandClient(deployment) as client:
            for command_id, command in work:
                client.submit(command, command_id=command_id)
            client.flush()
            for _ in range(KILLS):
                time.sleep(rng.uniform(0.5, 3.0))
                worker.stop(kill=True)
                worker.start(timeout=120)
            results = client.wait([cid for cid, _ in work], timeout=300)
        assert_read_models_match_the_log(deployment)
    finally:
        worker.stop()

    assert len(results) == len(work)
    assert_write_side_promises(deployment, results)
    outcomes = Counter(r.accepted for r in results)
    assert outcomes[True] > ACCOUNTS and outcomes[False] > 0
