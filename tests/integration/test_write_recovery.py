"""A restarted worker rebuilds every aggregate exactly from the log: with its local
state cache deleted (rebuilt from the snapshots and the events after them), with it
kept (only the tail is folded), and with both the cache and the snapshots gone (only
the event and result topics are left to rebuild from).

Checked per aggregate on the rebuilt worker: the next command gets version n+1 under
``expected_version=n``; a withdrawal of one more than the balance is refused and
one of exactly the balance is accepted (decisions read the rebuilt state); and an
old command id sent again is answered as before, writing nothing.
"""

from __future__ import annotations

import dataclasses
import random
import time
from pathlib import Path

import httpx
import pytest

from app.adapters import topics
from app.adapters.eventlog import CommandResult
from app.audit import new_codec
from app.client import CommandClient
from app.domain.accounts import OpenAccount, Withdraw
from app.domain.money import fmt
from app.local import deployments
from app.runtime import CommandHandler, TopicsChanged, drop_cache_of_other_topics
from app.settings import Settings
from app.workload import deposit, withdrawal
from app.writer import REPORT_S
from tests.invariants import (
    assert_balances_fold,
    assert_write_side_promises,
    serving_worker,
)
from tests.support import Consumed, events_by_aggregate

ACCOUNTS = 12
COMMANDS_EACH = 20
RECOVERY_DEADLINE_S = 120


def _history(client: CommandClient) -> dict[str, list[tuple[str, object]]]:
    rng = random.Random(5)
    sent: dict[str, list[tuple[str, object]]] = {}
    for n in range(ACCOUNTS):
        account = f"acc-{n:02d}"
        commands: list[object] = [
            OpenAccount(account_id=account, owner_id="o", currency="USD")
        ]
        for k in range(COMMANDS_EACH - 1):
            amount = rng.randint(1, 300)
            if rng.random() < 0.7:
                commands.append(deposit(account, amount, f"d{k}", source="s"))
            else:
                commands.append(_withdraw(account, amount, f"w{k}"))
        sent[account] = [
            (client.submit(command, command_id=f"{account}/{k}"), command)
            for k, command in enumerate(commands)
        ]
    return sent


def _withdraw(account: str, amount: int, reference: str) -> Withdraw:
    return withdrawal(account, amount, reference, destination="d", reference=reference)


LOSSES = ("local store", "nothing", "local store and snapshots")


def _stores(settings: Settings) -> dict[str, int]:
    """The running worker's snapshot figures for accounts (see ``CommandHandler``)."""
    status = httpx.get(f"{settings.web_url}/status", timeout=10).json()
    [process] = status["write"]["processes"]
    stores: dict[str, int] = process[f"{settings.app_id}.commands"]["stores"]["account"]
    return stores


def _snapshotted(settings: Settings) -> None:
    """Wait for two more rounds of snapshots of every partition: the second began
    after everything so far was committed."""
    wanted = _stores(settings)["snapshots"] + 2 * settings.partitions
    deadline = time.monotonic() + 60
    while _stores(settings)["snapshots"] < wanted:
        assert time.monotonic() < deadline, _stores(settings)
        time.sleep(0.2)


def _delete_snapshots(settings: Settings) -> None:
    """Delete the snapshot topic (the worker creates it again at start)."""
    admin = topics.admin_client(settings)
    topic = settings.topics.snapshots("accounts")
    admin.delete_topics([topic], operation_timeout=30)[topic].result(timeout=30)
    deadline = time.monotonic() + 30
    while topic in admin.list_topics(timeout=10).topics:
        assert time.monotonic() < deadline, f"{topic} was not deleted"
        time.sleep(0.2)


@pytest.mark.slow
def test_a_worker_that_lost_its_table_rebuilds_every_aggregate(
    deployment: Settings,
) -> None:
    deployment = dataclasses.replace(deployment, snapshot_interval_s=0.5)
    with serving_worker(deployment), CommandClient(deployment) as client:
        sent = _history(client)
        first = {
            r.command_id: r
            for r in client.wait(
                [cid for commands in sent.values() for cid, _ in commands],
                timeout=120,
            )
        }
        _snapshotted(deployment)
    answered = list(first.values())
    assert_write_side_promises(deployment, answered)
    # One loss after another, each followed by a restart that must rebuild exactly.
    for n, lost in enumerate(LOSSES):
        streams = events_by_aggregate(deployment, "accounts")
        balances = assert_balances_fold(streams)
        versions = {
            a: max(e["metadata"]["stream_version"] for e in s)
            for a, s in streams.items()
        }
        assert set(versions) == set(sent)
        if lost.startswith("local store"):
            deployments.delete_local_state(deployment)
        if lost.endswith("snapshots"):
            _delete_snapshots(deployment)
        # Restored from the snapshots only when they are there.
        restored = ACCOUNTS if lost == "local store" else 0
        after = _after_loss(deployment, sent, first, balances, versions, n, restored)
        answered += after.values()
        # Each restart sends a command id again.
        streams = assert_write_side_promises(deployment, answered, sent_once=False)
        assert assert_balances_fold(streams["accounts"]) == dict.fromkeys(sent, 11), (
            lost
        )


def _after_loss(
    deployment: Settings,
    sent: dict[str, list[tuple[str, object]]],
    first: dict[str, CommandResult],
    balances: dict[str, int],
    versions: dict[str, int],
    n: int,
    restored: int,
) -> dict[str, CommandResult]:
    """On a restarted worker, per account: a repeat of the last accepted command of
    the history, an overdraft, a withdrawal of exactly the balance under the
    expected version, and a deposit of 11; each checked against the log's fold."""
    with serving_worker(deployment), CommandClient(deployment) as client:
        refused, emptied, repeated, deposited = {}, {}, {}, {}
        for account in sent:
            old_id = max(
                (cid for cid, _ in sent[account] if first[cid].accepted),
                key=lambda cid: first[cid].version or 0,
            )
            old = dict(sent[account])[old_id]
            repeated[account] = client.submit(old, command_id=old_id)
            refused[account] = client.submit(
                _withdraw(account, balances[account] + 1, f"too-much-{n}")
            )
            emptied[account] = client.submit(
                _withdraw(account, balances[account], f"all-{n}"),
                expected_version=versions[account],
            )
            deposited[account] = client.submit(
                deposit(account, 11, f"after-{n}", source="s"),
                expected_version=versions[account] + 1,
            )
        ids = [
            *refused.values(),
            *emptied.values(),
            *repeated.values(),
            *deposited.values(),
        ]
        after = {r.command_id: r for r in client.wait(ids, timeout=RECOVERY_DEADLINE_S)}
        # The write process reports every REPORT_S: read a report sent after the
        # answers (the one before may predate the last partition's restore).
        time.sleep(2 * REPORT_S)
        assert _stores(deployment)["restored_states"] == restored
        _snapshotted(deployment)
    for account in sent:
        version = versions[account]
        no: CommandResult = after[refused[account]]
        assert no.code == "InsufficientFunds", (account, no)
        assert fmt(balances[account], "USD") in (no.message or ""), no.message
        all_out = after[emptied[account]]
        assert all_out.accepted and all_out.version == version + 1, (account, all_out)
        more = after[deposited[account]]
        assert more.accepted and more.version == version + 2, (account, more)
        again = after[repeated[account]]
        original = first[again.command_id]
        assert (again.version, again.event_ids, again.offset) == (
            original.version,
            original.event_ids,
            original.offset,
        ), account
    return after


def test_a_store_filled_from_topics_since_deleted_is_dropped(
    deployment: Settings,
) -> None:
    """The topics deleted and created again under their names (a Kafka reset), the
    workers' local stores left: the write side drops its store instead of reading
    another log's states and offsets. An account opened before does not exist in
    the new log (its open is accepted again), and the new topics' first commands
    are decided, not taken for commands taken before (their offsets start over)."""
    account = "acc-reset"
    with serving_worker(deployment), CommandClient(deployment) as client:
        opened = client.send(
            OpenAccount(account_id=account, owner_id="o", currency="USD")
        )
        for n in range(5):
            client.send(deposit(account, 10, f"before-{n}", source="s"))
    assert opened.accepted
    deployments.delete_topics(deployment)
    with serving_worker(deployment), CommandClient(deployment) as client:
        again = client.send(
            OpenAccount(account_id=account, owner_id="o", currency="USD"), timeout=60
        )
        assert again.accepted and again.version == 1, again
        after = client.send(deposit(account, 10, "after", source="s"), timeout=60)
        assert after.accepted and after.version == 2, after
    assert [
        e["metadata"]["event_type"]
        for e in events_by_aggregate(deployment, "accounts")[account]
    ] == ["AccountOpened", "MoneyDeposited"]


def test_a_running_write_process_stops_on_a_topic_created_again(
    deployment: Settings, tmp_path: Path
) -> None:
    """A command record below the last one the write process took (the group's
    offsets went back) is taken for one taken before, and skipped, only while the
    commands topic is the one the cache noted: deleted and created again under its
    name while the process runs, its offsets start over, and the process stops (to
    start again on a cache dropped for it) instead of skipping the new commands."""
    every = topics.required_topics(deployment) + topics.saga_topics(deployment)
    topics.ensure_topics(deployment, every)
    cache = tmp_path / "write-state"
    drop_cache_of_other_topics(deployment, cache)
    handler = CommandHandler(deployment, "accounts", new_codec(deployment), cache)
    commands = deployment.topics.commands("accounts")
    try:
        handler.store.commit(taken={(commands, 0): 5})
        handler.assigned([(commands, 0)])
        handler.handle(Consumed(commands, 0, 3), None)  # type: ignore[arg-type]
        assert handler.stats["taken_again"] == 1
        deployments.delete_topics(deployment)
        topics.ensure_topics(deployment, every)
        handler.assigned([(commands, 0)])
        with pytest.raises(TopicsChanged, match="created again"):
            handler.handle(Consumed(commands, 0, 3), None)  # type: ignore[arg-type]
    finally:
        handler.close()
