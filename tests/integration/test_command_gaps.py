"""The command processor does not trust its consumer to deliver every record: a
message beyond its own position makes it read the skipped ones back from the topic
and process them first, in order; and a partition that stopped short of its end is
probed, so that a skipped tail is noticed too. (Faust can drop a record when a
rebalance interrupts its fetcher and later commit past it; see app/runtime.py.)"""

from __future__ import annotations

import asyncio
from typing import Any

from app.adapters.catalog import SchemaCatalog
from app.adapters.codec import Codec, ConfluentRegistry
from app.adapters.eventlog import new_producer, partition_for, read_records
from app.client import CommandClient
from app.domain.accounts import Deposit, OpenAccount
from app.runtime import ACCOUNTS, PROBE_HEADER, CommandProcessor, Incoming, TableStore
from app.settings import Settings


def _processor(
    settings: Settings, producer: Any, store: TableStore | None = None
) -> CommandProcessor:
    catalog = SchemaCatalog.load()
    codec = Codec(ConfluentRegistry(settings.schema_registry_url), catalog)
    return CommandProcessor(
        settings=settings,
        aggregate=ACCOUNTS,
        store=store or TableStore({}, ACCOUNTS),
        codec=codec,
        catalog=catalog,
        producer=producer,
        events_topic=settings.topics.events("accounts"),
    )


def _sent(
    settings: Settings, client: CommandClient, deposits: int
) -> tuple[list[str], int, list[Incoming]]:
    """Open acc-gap and deposit into it; the command ids, its partition and the
    records there."""
    topic = settings.topics.commands("accounts")
    opened = OpenAccount(account_id="acc-gap", owner_id="o", currency="USD")
    ids = [client.submit(opened)]
    ids += [client.submit(_deposit(n)) for n in range(1, deposits + 1)]
    client.flush()
    partition = next(
        p
        for p in range(settings.partitions)
        if list(read_records(settings, topic, p, 0))
    )
    records = [
        Incoming(topic, partition, r.offset, r.key, r.value, r.headers)
        for r in read_records(settings, topic, partition, 0)
    ]
    return ids, partition, records


def _deposit(n: int, account: str = "acc-gap") -> Deposit:
    return Deposit(
        account_id=account,
        transaction_id=f"t{n}",
        amount_minor=100 * n,
        currency="USD",
        source="s",
        reference="",
    )


def test_skipped_commands_are_read_back_and_a_stalled_tail_is_probed(
    deployment: Settings,
) -> None:
    topic = deployment.topics.commands("accounts")
    client = CommandClient(deployment)
    ids, partition, records = _sent(deployment, client, deposits=3)
    assert [r.offset for r in records] == [0, 1, 2, 3]

    async def scenario() -> tuple[dict[str, object], list[int]]:
        producer = new_producer(deployment)
        await producer.start()
        try:
            processor = _processor(deployment, producer)
            store = processor.store
            await processor.process(records[0])
            # The consumer "skipped" offsets 1 and 2 and hands over offset 3.
            await processor.process(records[3])
            record = store.load("acc-gap")
            assert record is not None
            # The tail: offset 4 exists but never arrives. Two looks at an unmoved
            # position send one probe; processing it reveals nothing missing.
            high = 5
            await processor.probe_stalled(topic, {partition: high})
            await processor.probe_stalled(topic, {partition: high})
            await processor.probe_stalled(topic, {partition: high})
            return {
                "balance": record.state.balance_minor,  # type: ignore[attr-defined]
                "version": record.version,
                "position": store.next_command(partition),
            }, [
                r.offset
                for r in read_records(deployment, topic, partition, 0)
                if any(name == PROBE_HEADER for name, _ in r.headers)
            ]
        finally:
            await producer.stop()

    outcome, probes = asyncio.run(scenario())
    assert outcome == {"balance": 600, "version": 4, "position": 4}
    assert probes == [4]  # one probe, however often the stall is seen
    with client:
        results = client.wait(ids, timeout=30)
    assert [r.version for r in results] == [1, 2, 3, 4]
    assert all(r.accepted for r in results)


def test_a_partition_never_processed_here_starts_at_the_groups_commit(
    deployment: Settings,
) -> None:
    """With no position of its own (a partition new to this table, or a lost
    table), the group's committed offset is where processing starts: records the
    consumer dropped before its first delivery are read back, and a partition that
    delivered nothing at all is probed."""
    topic = deployment.topics.commands("accounts")
    client = CommandClient(deployment)
    ids, partition, records = _sent(deployment, client, deposits=2)

    async def scenario() -> tuple[int | None, int | None, list[int]]:
        producer = new_producer(deployment)
        await producer.start()
        try:
            idle = _processor(deployment, producer)
            for _ in range(3):  # nothing ever delivered: stalled at 0 of 3
                await idle.probe_stalled(topic, {partition: 3})
            late = _processor(deployment, producer)
            # The first delivery is offset 2; the group has committed nothing.
            await late.process(records[2])
            record = late.store.load("acc-gap")
            return (
                record.version if record else None,
                late.store.next_command(partition),
                [
                    r.offset
                    for r in read_records(deployment, topic, partition, 0)
                    if any(name == PROBE_HEADER for name, _ in r.headers)
                ],
            )
        finally:
            await producer.stop()

    version, position, probes = asyncio.run(scenario())
    assert (version, position, probes) == (3, 3, [3])
    with client:
        results = client.wait(ids, timeout=30)
    assert [r.version for r in results] == [1, 2, 3]


def test_a_batch_is_done_only_once_its_table_writes_are_durable(
    deployment: Settings,
) -> None:
    """Answers and marks are written, then awaited on the broker, before the batch
    returns (and Faust hands over the next). The open and the deposit share an
    aggregate, so the deposit waits for the open's flush: two flushes."""
    client = CommandClient(deployment)
    ids, partition, records = _sent(deployment, client, deposits=1)
    seen: list[object] = []

    class Recording(TableStore):
        async def durable(self) -> None:
            answered = sorted(i for i in ids if self.answer(i) is not None)
            seen.append((answered, self.next_command(partition)))
            await super().durable()

    async def scenario() -> None:
        producer = new_producer(deployment)
        await producer.start()
        try:
            store = Recording({}, ACCOUNTS)
            await _processor(deployment, producer, store).process_batch(records)
            seen.append("returned")
        finally:
            await producer.stop()

    asyncio.run(scenario())
    client.close()
    assert seen == [([ids[0]], 1), (sorted(ids), 2), "returned"]


def test_commands_of_an_aggregate_decided_in_a_batch_wait_for_the_next_wave(
    deployment: Settings,
) -> None:
    """One batch of one partition: open A, deposit A, open B, deposit B, deposit A.
    A command whose aggregate already has one decided is deferred, not a reason to
    flush there: three waves (both opens; both first deposits; A's second), each
    flushed once, with the partition's mark held at the first deferred command
    until it is decided."""
    topic = deployment.topics.commands("accounts")
    partitions = deployment.partitions
    a = "acc-wave-a"
    b = next(
        f"acc-wave-b{n}"
        for n in range(1000)
        if partition_for(f"acc-wave-b{n}".encode(), partitions)
        == partition_for(a.encode(), partitions)
    )
    partition = partition_for(a.encode(), partitions)
    client = CommandClient(deployment)
    ids = [
        client.submit(OpenAccount(account_id=a, owner_id="o", currency="USD")),
        client.submit(_deposit(1, a)),
        client.submit(OpenAccount(account_id=b, owner_id="o", currency="USD")),
        client.submit(_deposit(2, b)),
        client.submit(_deposit(3, a)),
    ]
    client.flush()
    records = [
        Incoming(topic, partition, r.offset, r.key, r.value, r.headers)
        for r in read_records(deployment, topic, partition, 0)
    ]
    assert [r.offset for r in records] == [0, 1, 2, 3, 4]
    seen: list[object] = []

    class Recording(TableStore):
        async def durable(self) -> None:
            answered = [n for n, i in enumerate(ids) if self.answer(i) is not None]
            seen.append((answered, self.next_command(partition)))
            await super().durable()

    async def scenario() -> tuple[int, int]:
        producer = new_producer(deployment)
        await producer.start()
        try:
            store = Recording({}, ACCOUNTS)
            await _processor(deployment, producer, store).process_batch(records)
            balances = [store.load(x) for x in (a, b)]
            assert all(r is not None for r in balances)
            return tuple(r.state.balance_minor for r in balances)  # type: ignore
        finally:
            await producer.stop()

    balances = asyncio.run(scenario())
    assert seen == [([0, 2], 1), ([0, 1, 2, 3], 4), ([0, 1, 2, 3, 4], 5)]
    assert balances == (400, 200)
    with client:
        results = client.wait(ids, timeout=30)
    assert [r.version for r in results] == [1, 2, 1, 2, 3]
    assert all(r.accepted for r in results)
    events = read_records(
        deployment, deployment.topics.events("accounts"), partition, 0
    )
    assert [r.key for r in events if r.key in (a.encode(), b.encode())] == [
        k.encode() for k in (a, b, a, b, a)
    ]
