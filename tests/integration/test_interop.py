"""Plain confluent-kafka clients interoperate: AvroSerializer-framed commands are
accepted, and AvroDeserializer reads Streamfold's events through its registry."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime
from typing import Any

from confluent_kafka import Consumer, Producer
from confluent_kafka.schema_registry import (
    SchemaRegistryClient,
    topic_record_subject_name_strategy,
)
from confluent_kafka.schema_registry.avro import AvroDeserializer, AvroSerializer
from confluent_kafka.serialization import MessageField, SerializationContext

from app.adapters.catalog import SchemaCatalog
from app.client import CommandClient
from app.domain import accounts, orders
from app.settings import Settings
from app.workload import deposit
from tests.support import results_by_command, running_worker


def test_a_plain_avro_serializer_command_is_accepted_and_events_deserialize(
    deployment: Settings,
) -> None:
    registry = SchemaRegistryClient({"url": deployment.schema_registry_url})
    catalog = SchemaCatalog.load()
    serializer = AvroSerializer(
        registry,
        catalog.schema("streamfold.accounts.OpenAccount"),
        conf={"subject.name.strategy": topic_record_subject_name_strategy},
    )
    topic = deployment.topics.commands("accounts")
    account, command_id = f"acc-{uuid.uuid4().hex[:6]}", str(uuid.uuid4())
    record = {
        "envelope": {
            "command_id": command_id,
            "correlation_id": command_id,
            "causation_id": command_id,
            "user_id": "external-client",
            "issued_at": datetime.now(UTC),
            "expected_version": None,
        },
        "account_id": account,
        "owner_id": "o-1",
        "currency": "EUR",
        "overdraft_limit_minor": 0,
    }
    value = serializer(record, SerializationContext(topic, MessageField.VALUE))
    producer = Producer(
        {**deployment.producer_config(), "partitioner": "murmur2_random"}
    )
    producer.produce(topic, value, key=account.encode())
    assert producer.flush(30) == 0

    with running_worker(deployment), CommandClient(deployment) as client:
        follow_up = client.send(deposit(account, 9, "t", currency="EUR", source="s"))
    assert follow_up.accepted and follow_up.version == 2
    [result] = results_by_command(deployment)[command_id]
    assert (result["status"], result["version"]) == ("ACCEPTED", 1)

    deserializer = AvroDeserializer(registry)
    consumer = Consumer(
        {
            **deployment.consumer_config(),
            "group.id": f"plain-{account}",
            "auto.offset.reset": "earliest",
        }
    )
    events_topic = deployment.topics.events("accounts")
    consumer.subscribe([events_topic])
    seen = []
    try:
        for _ in range(120):
            message = consumer.poll(0.5)
            if message is None or message.error():
                continue
            seen.append(
                deserializer(
                    message.value(),
                    SerializationContext(events_topic, MessageField.VALUE),
                )
            )
            if len(seen) == 2:
                break
    finally:
        consumer.close()
    assert [e["metadata"]["event_type"] for e in seen] == [
        "AccountOpened",
        "MoneyDeposited",
    ]
    assert seen[0]["metadata"]["user_id"] == "external-client"
    assert seen[1]["balance_after_minor"] == 9


def _envelope(command_id: str) -> dict[str, Any]:
    return {
        "command_id": command_id,
        "correlation_id": command_id,
        "causation_id": command_id,
        "user_id": "outside",
        "issued_at": datetime.now(UTC),
        "expected_version": None,
    }


def _every_command(
    order: str, other: str, account: str
) -> list[tuple[str, str, dict[str, Any]]]:
    """(area, record, fields): one of each command type, in an order they all pass."""
    line = {
        "product_id": "p-1",
        "quantity": 1,
        "unit_price_minor": 1000,
        "tax_rate_bps": 0,
    }
    create = {
        "customer_id": "c-1",
        "customer_name": "Outside Customer",
        "customer_email": "outside@example.com",
        "items": [line],
        "currency": "USD",
        "shipping_address": {
            "street": "1 Main St",
            "city": "Springfield",
            "state": "IL",
            "zip_code": "62701",
            "country": "USA",
        },
        "account_id": None,
    }
    money = {"currency": "USD", "amount_minor": 100, "reference": ""}
    return [
        ("orders", "CreateOrder", {"order_id": order, **create}),
        (
            "orders",
            "AddItem",
            {"order_id": order, "item": {**line, "product_id": "p-2"}},
        ),
        ("orders", "RemoveItem", {"order_id": order, "product_id": "p-2"}),
        (
            "orders",
            "ProcessPayment",
            {
                "order_id": order,
                "payment_id": "pay-1",
                "amount_minor": 1000,
                "currency": "USD",
                "method": "paypal",
                "transaction_id": "t-1",
            },
        ),
        (
            "orders",
            "ShipOrder",
            {"order_id": order, "tracking_number": "1Z", "carrier": "UPS"},
        ),
        ("orders", "DeliverOrder", {"order_id": order}),
        ("orders", "CreateOrder", {"order_id": other, **create}),
        ("orders", "CancelOrder", {"order_id": other, "reason": "changed mind"}),
        (
            "accounts",
            "OpenAccount",
            {
                "account_id": account,
                "owner_id": "o-1",
                "currency": "USD",
                "overdraft_limit_minor": 0,
            },
        ),
        (
            "accounts",
            "Deposit",
            {"account_id": account, "transaction_id": "d", "source": "cash", **money},
        ),
        (
            "accounts",
            "Withdraw",
            {
                "account_id": account,
                "transaction_id": "w",
                "destination": "bank",
                **money,
            },
        ),
        ("accounts", "CloseAccount", {"account_id": account, "reason": "done"}),
    ]


def _read_all(
    deployment: Settings, topic: str, deserializer: AvroDeserializer, until: Any
) -> list[dict[str, Any]]:
    consumer = Consumer(
        {
            **deployment.consumer_config(),
            "group.id": f"plain-{uuid.uuid4().hex[:6]}",
            "auto.offset.reset": "earliest",
        }
    )
    consumer.subscribe([topic])
    seen: list[dict[str, Any]] = []
    deadline = time.monotonic() + 90
    try:
        while not until(seen) and time.monotonic() < deadline:
            message = consumer.poll(0.5)
            if message is None or message.error():
                continue
            context = SerializationContext(topic, MessageField.VALUE)
            seen.append(deserializer(message.value(), context))
    finally:
        consumer.close()
    return seen


def test_every_command_type_from_a_plain_client_on_a_fresh_deployment(
    deployment: Settings,
) -> None:
    """An outside producer with auto-registration off finds every command's subject
    (the worker registered them at start), and reads every event type back."""
    registry = SchemaRegistryClient({"url": deployment.schema_registry_url})
    strategy = {"subject.name.strategy": topic_record_subject_name_strategy}
    tag = uuid.uuid4().hex[:6]
    commands = _every_command(f"ord-{tag}", f"ord2-{tag}", f"acc-{tag}")
    producer = Producer(
        {**deployment.producer_config(), "partitioner": "murmur2_random"}
    )
    command_ids = []
    with running_worker(deployment):
        for area, name, fields in commands:
            topic = deployment.topics.commands(area)
            subject = f"{topic}-streamfold.{area}.{name}"
            # What an outside producer has: the subject's latest schema.
            latest = registry.get_latest_version(subject).schema
            serializer = AvroSerializer(
                registry,
                latest,
                conf={
                    **strategy,
                    "auto.register.schemas": False,
                    "use.latest.version": True,
                },
            )
            command_id = str(uuid.uuid4())
            record = {"envelope": _envelope(command_id), **fields}
            value = serializer(record, SerializationContext(topic, MessageField.VALUE))
            key = str(next(v for k, v in fields.items() if k.endswith("_id")))
            producer.produce(topic, value, key=key.encode())
            command_ids.append(command_id)
        assert producer.flush(30) == 0

        deserializer = AvroDeserializer(registry, conf=strategy)
        results = _read_all(
            deployment,
            deployment.topics.results,
            deserializer,
            lambda seen: {r["command_id"] for r in seen} >= set(command_ids),
        )
        by_id = {r["command_id"]: r for r in results}
        assert [by_id[c]["status"] for c in command_ids] == ["ACCEPTED"] * len(
            commands
        ), [(c, by_id.get(c)) for c in command_ids]
        wanted = {
            f"streamfold.{area}.{cls.__name__}"
            for area, module in (("orders", orders), ("accounts", accounts))
            for cls in module.EVENTS
        }
        types: set[str] = set()
        # Eight order events (two orders) and four account events were written.
        for area, count in (("orders", 8), ("accounts", 4)):
            events = _read_all(
                deployment,
                deployment.topics.events(area),
                deserializer,
                lambda seen, count=count: len(seen) >= count,
            )
            types |= {
                f"streamfold.{area}.{e['metadata']['event_type']}" for e in events
            }
    assert types == wanted
