"""Projection runners against the real broker and Postgres: a runner applies a
partition only where Postgres still holds the position it last saw there (another
runner of the projection may have moved it) and gives fresh tables statistics;
runners hand partitions over under load without applying anything twice; a process
whose runner hits a bug is restarted; only offsets someone else committed are a
rewind."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import psycopg
from confluent_kafka import Consumer, Producer, TopicPartition

from app.domain import accounts
from app.domain.accounts import Deposit, OpenAccount
from app.projections.engine import COMMIT_MARK, ProjectionRunner, group_id
from app.projections.ledger import LedgerProjection
from app.projections.process import ProjectionProcess
from app.settings import Settings
from app.waiting import eventually
from app.workload import deposit
from bench.harness import domain_events, encode_events
from tests.support import codec_for

ACCOUNTS = [f"acc-{n}" for n in range(8)]
PARTITIONS = 4


def partition_of(account: str) -> int:
    return ACCOUNTS.index(account) % PARTITIONS


def deposits(first: int, count: int) -> list[Deposit]:
    """``count`` deposits on every account, interleaved across the accounts."""
    return [
        deposit(account, 1 + n, f"t-{n}")
        for n in range(first, first + count)
        for account in ACCOUNTS
    ]


def opening_and_deposits(count: int) -> list[Any]:
    opening = [
        OpenAccount(account_id=a, owner_id="o", currency="USD") for a in ACCOUNTS
    ]
    return [*opening, *deposits(0, count)]


def events_of(commands: list[Any]) -> list[tuple[dict[str, Any], Any]]:
    """One event per command, as the write side would append them."""
    made = domain_events(
        accounts,
        accounts.AGGREGATE_TYPE,
        commands,
        start=datetime(2026, 3, 1, tzinfo=UTC),
    )
    assert len(made) == len(commands)
    return made


def produce(settings: Settings, events: list[tuple[dict[str, Any], Any]]) -> None:
    """Append ``events`` to each account's own partition."""
    topic = settings.topics.events("accounts")
    producer = Producer(settings.producer_config())
    framed = encode_events(codec_for(settings), topic, events)
    for outgoing, (meta, _) in zip(framed, events, strict=True):
        producer.produce(
            topic,
            outgoing.value,
            key=outgoing.key,
            partition=partition_of(meta["aggregate_id"]),
            headers=outgoing.headers,
        )
    assert producer.flush(30) == 0


def highs(settings: Settings) -> dict[int, int]:
    consumer = Consumer(
        {**settings.consumer_config(), "group.id": f"{settings.app_id}.highs"}
    )
    topic = settings.topics.events("accounts")
    try:
        return {
            p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=30)[1]
            for p in range(PARTITIONS)
        }
    finally:
        consumer.close()


def caught_up(runner: ProjectionRunner, settings: Settings) -> None:
    topic = settings.topics.events("accounts")
    for partition, high in highs(settings).items():
        assert runner.wait_for(topic, partition, high - 1, 60), (
            f"{topic}[{partition}] not applied up to {high}: {runner.status}"
        )


def query(settings: Settings, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(settings.database_url, autocommit=True) as conn:
        cur = conn.execute(sql, args)  # type: ignore[arg-type]
        return cur.fetchall() if cur.description else []


def test_a_runner_applies_only_where_postgres_still_holds_its_position(
    deployment: Settings,
) -> None:
    opening = [
        OpenAccount(account_id=a, owner_id="o", currency="USD") for a in ACCOUNTS
    ]
    # 8 openings and 1,136 deposits (past the runner's first statistics check), then
    # a wave of 3 deposits per account.
    first = [*opening, *deposits(0, 142)]
    events = events_of([*first, *deposits(1000, 3)])
    produce(deployment, events[: len(first)])
    runner = ProjectionRunner(deployment, LedgerProjection(), codec_for(deployment))
    runner.start()
    try:
        caught_up(runner, deployment)

        # The fresh tables got statistics from the runner, not a minute later.
        def analyzed() -> bool:
            rows = query(
                deployment,
                "SELECT relname FROM pg_stat_user_tables WHERE relname = ANY(%s) "
                "AND coalesce(last_analyze, last_autoanalyze) IS NOT NULL",
                ["transactions", "account_balances", "projection_streams"],
            )
            return len(rows) == 3

        assert eventually(analyzed, timeout=20, every=0.2)

        # Another runner of the projection (a rebalance handed it partition 0) has
        # applied the first three events the next wave puts there.
        held = highs(deployment)[0]
        query(
            deployment,
            "UPDATE projection_positions SET next_offset = %s "
            "WHERE projection = 'ledger' AND topic = %s AND partition = 0",
            held + 3,
            deployment.topics.events("accounts"),
        )
        produce(deployment, events[len(first) :])  # 6 events per partition
        caught_up(runner, deployment)
    finally:
        runner.stop()
    assert runner.status.error is None
    # Partition 0 holds acc-0 and acc-4; its wave went acc-0, acc-4, acc-0, acc-4...
    # The runner left the three events the other one had, and nothing else.
    missing = query(
        deployment,
        "SELECT t.account_id, t.transaction_id FROM unnest(%s::text[], %s::text[]) "
        "AS t(account_id, transaction_id) WHERE NOT EXISTS (SELECT 1 FROM "
        "transactions x WHERE x.account_id = t.account_id AND "
        "x.transaction_id = t.transaction_id) ORDER BY 1, 2",
        [c.account_id for c in deposits(1000, 3)],
        [c.transaction_id for c in deposits(1000, 3)],
    )
    assert missing == [("acc-0", "t-1000"), ("acc-0", "t-1001"), ("acc-4", "t-1000")]
    assert query(deployment, "SELECT count(*) FROM transactions") == [
        (8 * 142 + 8 * 3 - 3,)
    ]
    assert query(
        deployment,
        "SELECT partition, next_offset FROM projection_positions "
        "WHERE projection = 'ledger' ORDER BY partition",
    ) == sorted(highs(deployment).items())


def test_a_process_whose_runner_stops_on_a_bug_exits_and_is_restarted(
    deployment: Settings,
) -> None:
    # A schema without the bookkeeping tables: the runner fails on assignment with
    # an error no retry fixes.
    runners = ProjectionProcess(deployment, ("ledger",), schema="no_such_schema")
    runners.start()
    try:
        assert eventually(lambda: runners.exits >= 2, timeout=90, every=0.2), (
            runners.statuses
        )
        error = runners.statuses["ledger"].error or ""
        assert error.startswith("a projection process exited (code 1, last error: ")
        assert "stopped: UndefinedTable" in error
    finally:
        runners.stop()
    assert not runners.running


def commit(settings: Settings, offset: int, metadata: str | None) -> None:
    """Commit ``offset`` for the ledger group on every accounts partition."""
    consumer = Consumer(
        {
            **settings.consumer_config(),
            "group.id": group_id(settings, "ledger"),
            "enable.auto.commit": False,
        }
    )
    topic = settings.topics.events("accounts")
    try:
        consumer.commit(
            offsets=[
                TopicPartition(topic, p, offset, metadata=metadata or "")
                for p in range(PARTITIONS)
            ],
            asynchronous=False,
        )
    finally:
        consumer.close()


def test_group_offsets_behind_postgres_are_a_rewind_only_if_not_a_runners_own(
    deployment: Settings,
) -> None:
    produce(deployment, events_of(list(opening_and_deposits(20))))
    codec = codec_for(deployment)

    def fold() -> ProjectionRunner:
        runner = ProjectionRunner(deployment, LedgerProjection(), codec)
        runner.start()
        try:
            caught_up(runner, deployment)
        finally:
            runner.stop()
        assert runner.status.error is None
        return runner

    assert fold().status.applied == 8 * 21
    # A runner that died between its Postgres commit and its Kafka commit leaves
    # its own (marked) offsets behind Postgres: resume from Postgres, fold nothing.
    commit(deployment, 1, COMMIT_MARK)
    resumed = fold()
    assert (resumed.status.rebuilt_at, resumed.status.applied) == (None, 0)
    # Someone else rewound the group (as Kafka's consumer-groups tool does, no
    # metadata): rebuild from the beginning.
    commit(deployment, 0, None)
    rebuilt = fold()
    assert rebuilt.status.rebuilt_at is not None
    assert rebuilt.status.applied == 8 * 21
    assert query(deployment, "SELECT count(*) FROM transactions") == [(8 * 20,)]


def test_runners_handing_partitions_over_under_load_apply_every_event_once(
    deployment: Settings,
) -> None:
    events = events_of(opening_and_deposits(1200))  # 9,608 events
    waves = [events[:808], events[808:4808], events[4808:]]
    codec = codec_for(deployment)
    first = ProjectionRunner(deployment, LedgerProjection(), codec, batch_size=50)
    second = ProjectionRunner(deployment, LedgerProjection(), codec, batch_size=50)
    produce(deployment, waves[0])
    first.start()
    try:
        caught_up(first, deployment)
        # A second runner joins: the partitions are split between the two.
        second.start()
        assert eventually(lambda: bool(second.status.positions), timeout=60, every=0.2)
        produce(deployment, waves[1])
        assert eventually(lambda: second.status.applied > 0, timeout=60, every=0.2)
        # The first leaves with batches in hand; the second takes them all.
        produce(deployment, waves[2])
        first.stop()
        caught_up(second, deployment)
    finally:
        first.stop()
        second.stop()
    assert (first.status.error, second.status.error) == (None, None)
    assert first.status.applied + second.status.applied == len(events)
    # Counters added to by every deposit: one more application would show here.
    amounts = sum(1 + n for n in range(1200)) * 8
    assert query(
        deployment,
        "SELECT sum(deposits_minor), sum(deposit_count) FROM financial_daily_totals",
    ) == [(amounts, 8 * 1200)]
    assert query(deployment, "SELECT count(*) FROM transactions") == [(8 * 1200,)]
