"""Promises 2, 4 and 5 under SIGKILL: the worker is killed at random moments while
thousands of commands flow, restarted, and the log and results are then checked."""

from __future__ import annotations

import random
import time
from collections import Counter
from typing import Any

from app.client import CommandClient
from app.domain.accounts import Deposit, OpenAccount, Withdraw
from app.local.worker import WorkerProcess
from app.settings import Settings
from tests.invariants import assert_write_side_promises

ACCOUNTS = 40
COMMANDS = 2400
KILLS = 4


def _workload(seed: int) -> list[tuple[str, Any]]:
    rng = random.Random(seed)
    ids = [f"acc-{n:03d}" for n in range(ACCOUNTS)]
    work: list[tuple[str, Any]] = [
        (f"open-{a}", OpenAccount(account_id=a, owner_id=f"owner-{a}", currency="USD"))
        for a in ids
    ]
    for n in range(COMMANDS - ACCOUNTS):
        account = rng.choice(ids)
        amount = rng.randint(1, 500)
        if rng.random() < 0.6:
            command: Any = Deposit(
                account_id=account,
                transaction_id=f"t{n}",
                amount_minor=amount,
                currency="USD",
                source="s",
                reference="",
            )
        else:
            # Some withdrawals overdraw on purpose and must be rejected.
            command = Withdraw(
                account_id=account,
                transaction_id=f"t{n}",
                amount_minor=amount,
                currency="USD",
                destination="d",
                reference="",
            )
        work.append((f"cmd-{n}", command))
    return work


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
    finally:
        worker.stop()

    assert len(results) == len(work)
    assert_write_side_promises(deployment, results)
    outcomes = Counter(r.accepted for r in results)
    assert outcomes[True] > ACCOUNTS and outcomes[False] > 0
