"""Plain confluent-kafka clients interoperate: AvroSerializer-framed commands are
accepted, and AvroDeserializer reads Streamfold's events through its registry."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from confluent_kafka import Consumer, Producer
from confluent_kafka.schema_registry import (
    SchemaRegistryClient,
    topic_record_subject_name_strategy,
)
from confluent_kafka.schema_registry.avro import AvroDeserializer, AvroSerializer
from confluent_kafka.serialization import MessageField, SerializationContext

from app.adapters.catalog import SchemaCatalog
from app.client import CommandClient
from app.domain.accounts import Deposit
from app.settings import Settings
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
        follow_up = client.send(
            Deposit(
                account_id=account,
                transaction_id="t",
                amount_minor=9,
                currency="EUR",
                source="s",
                reference="",
            )
        )
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
