"""The order payment saga against the real broker: outcomes, the deadline and a late
withdrawal, SIGKILL amid many sagas, and a replay of the saga's consumer group."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import httpx
import psycopg
import pytest
from confluent_kafka import Consumer, TopicPartition

from app.adapters.eventlog import partition_for
from app.adapters.saga_io import feed_group
from app.adapters.topics import inbox_topic
from app.application import saga
from app.application.saga import Step
from app.client import CommandClient
from app.domain.accounts import CloseAccount
from app.history import EventStore
from app.local.process import Daemon
from app.local.worker import WorkerProcess
from app.settings import Settings
from app.waiting import eventually
from app.workload import charged_order, funded_account
from app.writer import command_group
from tests.support import (
    codec_for,
    events_by_aggregate,
    read_topic,
    rewind_group,
    running_worker,
)


def _id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def _until(check: Callable[[], Any], timeout: float, what: str) -> Any:
    found = eventually(check, timeout=timeout, every=0.2)
    if not found:
        raise AssertionError(f"timed out after {timeout}s waiting for {what}")
    return found


def _supervised(worker: Daemon, check: Callable[[], Any]) -> Callable[[], Any]:
    """``check``, restarting the worker first if it stopped: the write side stops
    (fail-stop) on failures it must not paper over, and a supervisor restarts it."""

    def run() -> Any:
        if worker.pid() is None:
            worker.start(timeout=120)
        try:
            return check()
        except httpx.TransportError:
            return None  # stopped just now; restarted on the next round

    return run


def _open(
    client: CommandClient, account: str, funds: int, currency: str = "EUR"
) -> None:
    for command in funded_account(account, funds, currency=currency):
        assert client.send(command, timeout=60).accepted


def _saga_view(settings: Settings, order_id: str) -> dict[str, Any] | None:
    url = f"{settings.web_url}/sagas/{order_id}"
    response = httpx.get(url, timeout=10)
    # 503: the worker is still taking over its partitions (after a start or rebalance).
    if response.status_code in (404, 503):
        return None
    response.raise_for_status()
    return dict(response.json())


def _settled(settings: Settings, order_id: str) -> dict[str, Any] | None:
    view = _saga_view(settings, order_id)
    return view if view is not None and view["settled"] else None


def _saga_commands(settings: Settings) -> Counter[str]:
    """How often each of the saga's command ids was put on a commands topic."""
    codec = codec_for(settings)
    sent: Counter[str] = Counter()
    for area in ("orders", "accounts"):
        for message in read_topic(settings, settings.topics.commands(area)):
            if dict(message.headers).get("forwarded-from"):
                continue  # the write side's own copy to the right partition
            command_id = codec.decode(message.value).data["envelope"]["command_id"]  # type: ignore[arg-type]
            if saga.parse_command_id(command_id):
                sent[command_id] += 1
    return sent


def _unique(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per event id: a worker killed mid-append may write one twice."""
    seen: dict[str, dict[str, Any]] = {}
    for event in events:
        seen.setdefault(event["metadata"]["event_id"], event)
    return sorted(seen.values(), key=lambda e: e["metadata"]["stream_version"])


def _types(events: list[dict[str, Any]]) -> list[str]:
    return [e["metadata"]["event_type"] for e in _unique(events)]


def _balance(events: list[dict[str, Any]]) -> int:
    return int(_unique(events)[-1]["balance_after_minor"])


# Long enough for an answer on a loaded machine, short enough to wait for.
TIMEOUT_S = 8


@pytest.mark.slow
def test_outcomes_the_deadline_and_the_history_of_a_flow(
    deployment: Settings,
) -> None:
    deployment = replace(deployment, saga_timeout_s=TIMEOUT_S)
    rich, poor, closed, dollars = (_id(p) for p in ("rich", "poor", "closed", "usd"))
    happy, broke, shut, foreign, plain = (
        _id(p) for p in ("happy", "broke", "shut", "foreign", "plain")
    )
    with running_worker(deployment), CommandClient(deployment) as client:
        _open(client, rich, 10_000)
        _open(client, poor, 100)
        _open(client, closed, 0)
        assert client.send(CloseAccount(account_id=closed, reason="moved")).accepted
        _open(client, dollars, 10_000, "USD")
        results = {
            order: client.send(
                charged_order(order, account, 4200), correlation_id=f"flow-{order}"
            )
            for order, account in (
                (happy, rich),
                (broke, poor),
                (shut, closed),
                (foreign, dollars),
                (plain, None),
            )
        }
        assert all(r.accepted for r in results.values())
        views = {
            order: _until(lambda o=order: _settled(deployment, o), 60, f"saga {order}")
            for order in (happy, broke, shut, foreign)
        }
        assert _saga_view(deployment, plain) is None

        # Happy path: charged once, recorded on the order, every step linked.
        assert (views[happy]["phase"], views[happy]["money"]) == ("PAID", "TAKEN")
        steps = views[happy]["history"]
        assert [s["message_type"] for s in steps] == ["Created", "Withdrawn", "Paid"]
        withdraw = steps[0]["sent"][0]
        assert withdraw == {
            "command_id": saga.command_id(happy, Step.WITHDRAW),
            "command_type": "Withdraw",
            "causation_id": results[happy].event_ids[0],  # the OrderCreated event
        }
        assert steps[1]["sent"][0]["command_type"] == "ProcessPayment"
        assert steps[1]["sent"][0]["causation_id"] == steps[1]["message_id"]
        order_streams = events_by_aggregate(deployment, "orders")
        account_streams = events_by_aggregate(deployment, "accounts")
        payment = _unique(order_streams[happy])[-1]
        assert payment["metadata"]["event_type"] == "PaymentProcessed"
        assert (payment["method"], payment["amount_minor"]) == ("account", 4200)
        assert payment["metadata"]["correlation_id"] == f"flow-{happy}"
        charged = _unique(account_streams[rich])[-1]
        assert charged["metadata"]["event_type"] == "MoneyWithdrawn"
        assert charged["transaction_id"] == f"order-payment:{happy}"
        assert charged["metadata"]["correlation_id"] == f"flow-{happy}"
        assert charged["metadata"]["command_id"] == withdraw["command_id"]
        assert charged["metadata"]["user_id"] == saga.ACTOR
        assert _balance(account_streams[rich]) == 10_000 - 4200

        # Refusals arrive as results and cancel the order with their reason.
        for order, code in (
            (broke, "InsufficientFunds"),
            (shut, "AccountClosed"),
            (foreign, "CurrencyMismatch"),
        ):
            assert (views[order]["phase"], views[order]["money"]) == (
                "CANCELLED",
                "REFUSED",
            )
            last = _unique(order_streams[order])[-1]
            assert last["metadata"]["event_type"] == "OrderCancelled"
            assert code in last["reason"], last["reason"]
        assert _balance(account_streams[poor]) == 100
        assert _types(order_streams[plain]) == ["OrderCreated"]

        # The whole flow under the order's correlation id, across both aggregates.
        def flow() -> list[str]:
            with psycopg.connect(deployment.query_database_url) as conn:
                events = EventStore(conn).read_correlation(f"flow-{happy}")
            return [e.event_type for e in events]

        _until(lambda: len(flow()) == 3, 60, "the flow in the event-log index")
        assert flow() == ["OrderCreated", "MoneyWithdrawn", "PaymentProcessed"]
        printed = subprocess.run(
            [
                sys.executable,
                "-m",
                "app.cli",
                "history",
                "--correlation",
                f"flow-{happy}",
            ],
            env={**os.environ, **deployment.as_env()},
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
        assert "MoneyWithdrawn" in printed and "PaymentProcessed" in printed

        _deadline_then_a_late_withdrawal(deployment, client)
    # Nothing ran twice: each of the saga's commands was sent once.
    assert set(_saga_commands(deployment).values()) == {1}


def _deadline_then_a_late_withdrawal(settings: Settings, client: CommandClient) -> None:
    """The account's answer reaches the saga after its deadline: a stalled member of
    the saga's feed group holds the account's partition (as a hung worker would), so
    for the saga the withdrawal is late, exactly as if the account had been slow."""
    staller = Consumer(
        {
            **settings.consumer_config(),
            "group.id": feed_group(settings),
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            # A group's members agree on one assignment protocol: the feed's.
            "partition.assignment.strategy": "cooperative-sticky",
        }
    )
    staller.subscribe(_feed_sources(settings))
    accounts_topic = settings.topics.events("accounts")
    orders_topic = settings.topics.events("orders")

    def shared() -> dict[str, set[int]] | None:
        staller.poll(0.2)  # joins the group; what it fetches it never routes
        held: dict[str, set[int]] = defaultdict(set)
        for tp in staller.assignment():
            held[tp.topic].add(tp.partition)
        everything = set(range(settings.partitions))
        if held[accounts_topic] and held[orders_topic] != everything:
            return held
        return None

    held = _until(shared, 60, "a share of the saga feed's partitions")

    def pick(prefix: str, keep: Callable[[int], bool]) -> str:
        while True:
            candidate = _id(prefix)
            if keep(partition_for(candidate.encode(), settings.partitions)):
                return candidate

    account = pick("acc", lambda p: p in held[accounts_topic])
    order = pick("ord", lambda p: p not in held[orders_topic])
    _open(client, account, 10_000)
    created = client.send(
        charged_order(order, account, 4200), correlation_id=f"flow-{order}"
    )
    assert created.accepted

    def given_up() -> dict[str, Any] | None:
        view = _saga_view(settings, order)
        return view if view and view["phase"] == "CANCELLED" else None

    view = _until(given_up, 60, "the saga to give up")
    assert view["money"] == "REQUESTED"  # it does not know the money was taken
    assert f"within {TIMEOUT_S}s" in view["reason"]
    assert [s["message_type"] for s in view["history"]] == [
        "Created",
        "TimedOut",
        "Cancelled",
    ]
    staller.close()  # the feed gets the partition back and routes the withdrawal

    done = _until(lambda: _settled(settings, order), 60, "the refund")
    assert done["money"] == "REFUNDED"
    refund = next(s for s in done["history"] if s["message_type"] == "Withdrawn")
    assert refund["sent"][0]["command_type"] == "Deposit"
    assert refund["sent"][0]["causation_id"] == refund["message_id"]
    orders_log = events_by_aggregate(settings, "orders")[order]
    assert _types(orders_log) == ["OrderCreated", "OrderCancelled"]
    account_log = _unique(events_by_aggregate(settings, "accounts")[account])
    assert [e["metadata"]["event_type"] for e in account_log] == [
        "AccountOpened",
        "MoneyDeposited",
        "MoneyWithdrawn",
        "MoneyDeposited",
    ]
    assert account_log[-1]["transaction_id"] == f"order-refund:{order}"
    assert account_log[-1]["balance_after_minor"] == 10_000
    flow = {f"flow-{order}"}
    assert {e["metadata"]["correlation_id"] for e in account_log[2:]} == flow
    assert {e["metadata"]["correlation_id"] for e in orders_log} == flow


def _feed_sources(settings: Settings) -> list[str]:
    return [
        settings.topics.events("orders"),
        settings.topics.events("accounts"),
        settings.topics.results,
    ]


def _caught_up(settings: Settings, group: str, topics: list[str]) -> bool:
    """Whether ``group`` has committed everything currently in ``topics``."""
    consumer = Consumer({**settings.consumer_config(), "group.id": group})
    try:
        wanted = [
            TopicPartition(t, p) for t in topics for p in range(settings.partitions)
        ]
        for tp in consumer.committed(wanted, timeout=30):
            _, high = consumer.get_watermark_offsets(tp, timeout=30)
            if high > 0 and tp.offset < high:
                return False
        return True
    finally:
        consumer.close()


ACCOUNTS = 8
ORDERS = 60
KILLS = 2


@pytest.mark.slow
def test_sigkill_amid_many_sagas_then_a_replay_of_its_group(
    deployment: Settings,
) -> None:
    deployment = replace(deployment, saga_timeout_s=60)
    rng = random.Random(5)
    funding = {f"acc-{n}": rng.choice([0, 2000, 5000, 20_000]) for n in range(ACCOUNTS)}
    closed = "acc-0"
    funding[closed] = 0  # only an empty account can be closed
    prices = {f"ord-{n:03d}": rng.randint(500, 3000) for n in range(ORDERS)}
    owner = {order: rng.choice(sorted(funding)) for order in prices}
    worker = WorkerProcess(deployment)
    worker.start(timeout=120)
    try:
        with CommandClient(deployment) as client:
            for account, funds in funding.items():
                _open(client, account, funds)
            assert client.send(CloseAccount(account_id=closed, reason="gone")).accepted
            for order, price in prices.items():
                client.submit(
                    charged_order(order, owner[order], price),
                    correlation_id=f"flow-{order}",
                )
            client.flush()
            for _ in range(KILLS):
                time.sleep(rng.uniform(0.3, 1.5))
                worker.stop(kill=True)
                worker.start(timeout=120)
        for order in prices:
            _until(
                _supervised(worker, lambda o=order: _settled(deployment, o)),
                120,
                f"saga {order} (worker log: {worker.log_file})",
            )
        worker.stop()
        sent = _saga_commands(deployment)

        # Replay the saga's own group from the start: it recognises every message it
        # already acted on and sends nothing again.
        rewind_group(deployment, feed_group(deployment), _feed_sources(deployment))
        worker.start(timeout=120)
        sources, inbox = _feed_sources(deployment), [inbox_topic(deployment)]
        _until(
            _supervised(
                worker, lambda: _caught_up(deployment, feed_group(deployment), sources)
            ),
            60,
            "the saga's feed to replay its sources",
        )
        _until(
            _supervised(
                worker, lambda: _caught_up(deployment, command_group(deployment), inbox)
            ),
            60,
            "the saga to act on the replayed inbox",
        )
        assert _saga_commands(deployment) == sent
    finally:
        worker.stop()

    order_logs = events_by_aggregate(deployment, "orders")
    account_logs = {
        a: _unique(e) for a, e in events_by_aggregate(deployment, "accounts").items()
    }
    movements: dict[str, Counter[str]] = defaultdict(Counter)
    for events in account_logs.values():
        for event in events:
            if event["metadata"]["event_type"] in ("MoneyWithdrawn", "MoneyDeposited"):
                movements[event["transaction_id"]][event["metadata"]["event_type"]] += 1
    paid_total: Counter[str] = Counter()
    outcomes: Counter[str] = Counter()
    for order, price in prices.items():
        kinds = _types(order_logs[order])
        charged = movements[f"order-payment:{order}"]["MoneyWithdrawn"]
        refunded = movements[f"order-refund:{order}"]["MoneyDeposited"]
        assert charged <= 1, f"{order} charged {charged} times"
        if "PaymentProcessed" in kinds:
            assert kinds == ["OrderCreated", "PaymentProcessed"], (order, kinds)
            assert (charged, refunded) == (1, 0), order
            paid_total[owner[order]] += price
            outcomes["paid"] += 1
        else:
            assert kinds == ["OrderCreated", "OrderCancelled"], (order, kinds)
            assert refunded == charged, order
            outcomes["cancelled"] += 1
    for account, funds in funding.items():
        events = account_logs[account]
        balance = 0
        for event in events:
            kind = event["metadata"]["event_type"]
            if kind == "MoneyDeposited":
                balance += event["amount_minor"]
            elif kind == "MoneyWithdrawn":
                balance -= event["amount_minor"]
            if "balance_after_minor" in event:
                assert event["balance_after_minor"] == balance, account
        assert balance == funds - paid_total[account], account
    assert outcomes["paid"] > 0 and outcomes["cancelled"] > 0, outcomes
