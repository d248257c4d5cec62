"""The command processor does not trust its consumer to deliver every record: a
message beyond its own position makes it read the skipped ones back from the topic
and process them first, in order; and a partition that stopped short of its end is
probed, so that a skipped tail is noticed too. (Faust can drop a record when a
rebalance interrupts its fetcher and later commit past it; see app/runtime.py.)"""

from __future__ import annotations

import asyncio

from app.adapters.catalog import SchemaCatalog
from app.adapters.codec import Codec, ConfluentRegistry
from app.adapters.eventlog import (
    KafkaEventLog,
    KafkaResults,
    new_producer,
    read_records,
)
from app.application.commands import CommandService
from app.client import CommandClient
from app.domain.accounts import Deposit, OpenAccount
from app.runtime import ACCOUNTS, PROBE_HEADER, CommandProcessor, Incoming, TableStore
from app.settings import Settings


def _deposit(n: int) -> Deposit:
    return Deposit(
        account_id="acc-gap",
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
    opened = OpenAccount(account_id="acc-gap", owner_id="o", currency="USD")
    ids = [client.submit(opened), *(client.submit(_deposit(n)) for n in (1, 2, 3))]
    client.flush()
    partition = next(
        p
        for p in range(deployment.partitions)
        if list(read_records(deployment, topic, p, 0))
    )
    records = [
        Incoming(topic, partition, r.offset, r.key, r.value, r.headers)
        for r in read_records(deployment, topic, partition, 0)
    ]
    assert [r.offset for r in records] == [0, 1, 2, 3]

    async def scenario() -> tuple[dict[str, object], list[int]]:
        catalog = SchemaCatalog.load()
        codec = Codec(ConfluentRegistry(deployment.schema_registry_url), catalog)
        producer = new_producer(deployment)
        await producer.start()
        try:
            store = TableStore({}, ACCOUNTS)
            events = deployment.topics.events("accounts")
            processor = CommandProcessor(
                settings=deployment,
                aggregate=ACCOUNTS,
                service=CommandService(
                    aggregate=ACCOUNTS,
                    store=store,
                    log=KafkaEventLog(producer, codec, catalog, events),
                ),
                store=store,
                codec=codec,
                catalog=catalog,
                results=KafkaResults(producer, codec, deployment.topics.results),
                producer=producer,
                events_topic=events,
            )
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
