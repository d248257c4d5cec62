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
from tests.support import events_by_aggregate, results_by_command

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


def _canonical(result: dict[str, Any]) -> tuple[Any, ...]:
    return (
        result["status"],
        result["version"],
        tuple(result["event_ids"]),
        result["code"],
        result["partition"],
        result["offset"],
    )


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

    # Promise 2: exactly one result per command (a repeat after a crash is identical).
    assert len(results) == len(work)
    logged = results_by_command(deployment)
    for command_id, _ in work:
        assert len({_canonical(r) for r in logged[command_id]}) == 1, command_id

    # Promise 4: versions 1..n, never two different events at one version.
    streams = events_by_aggregate(deployment, "accounts")
    accepted_ids = {e for r in results if r.accepted for e in r.event_ids}
    for account, events in streams.items():
        by_version: dict[int, set[str]] = {}
        for event in events:
            meta = event["metadata"]
            by_version.setdefault(meta["stream_version"], set()).add(meta["event_id"])
        assert sorted(by_version) == list(range(1, len(by_version) + 1)), account
        assert all(len(ids) == 1 for ids in by_version.values()), account
        # Promise 5 on the write side: the state the writer reported equals the fold.
        unique = {e["metadata"]["stream_version"]: e for e in events}
        balance = 0
        for version in sorted(unique):
            event = unique[version]
            if event["metadata"]["event_type"] == "MoneyDeposited":
                balance += event["amount_minor"]
            elif event["metadata"]["event_type"] == "MoneyWithdrawn":
                balance -= event["amount_minor"]
            if "balance_after_minor" in event:
                assert event["balance_after_minor"] == balance, (account, version)
            assert balance >= 0
    # No acknowledged command was lost: every accepted event id is in the log.
    in_log = {e["metadata"]["event_id"] for events in streams.values() for e in events}
    assert accepted_ids <= in_log
    outcomes = Counter(r.accepted for r in results)
    assert outcomes[True] > ACCOUNTS and outcomes[False] > 0
