"""The client API: produce commands and wait for their results.

Any Kafka client can produce commands (Confluent-framed Avro, key = aggregate id);
this one adds the envelope, the framing and the wait for ``command-results``.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypedDict, Unpack

from confluent_kafka import (
    Consumer,
    KafkaException,
    Producer,
    TopicPartition,
)

from app.adapters import mapper
from app.adapters.catalog import SchemaCatalog
from app.adapters.codec import Codec, ConfluentRegistry, Headers, headers
from app.adapters.eventlog import CommandResult, partition_for
from app.adapters.topics import end_offsets, take
from app.domain import accounts, orders
from app.settings import Settings

AREAS = {
    orders.AGGREGATE_TYPE: ("orders", orders),
    accounts.AGGREGATE_TYPE: ("accounts", accounts),
}


# Kafka's Java client and aiokafka (so Faust's router) hash keys with murmur2;
# librdkafka's default differs, which would split one aggregate across partitions.
PARTITIONER = "murmur2_random"


class CommandTimeout(TimeoutError):
    """No result arrived in time; the command may still be processed later."""


def area_of(command: Any) -> str:
    """The topic area ("orders" / "accounts") a command class belongs to."""
    for area, module in AREAS.values():
        if type(command) in module.COMMANDS:
            return area
    raise TypeError(f"{type(command).__name__} is not a Streamfold command")


def aggregate_id_of(command: Any) -> str:
    """The id of the aggregate ``command`` is for (an order's commands carry an
    ``account_id`` too, so the area decides which field it is)."""
    return str(command.order_id if area_of(command) == "orders" else command.account_id)


class EnvelopeFields(TypedDict, total=False):
    """What a caller may set of a command's envelope (see ``new_envelope``)."""

    command_id: str | None
    correlation_id: str | None
    causation_id: str | None
    user_id: str | None
    expected_version: int | None
    issued_at: datetime | None


def new_envelope(**given: Unpack[EnvelopeFields]) -> dict[str, Any]:
    """A command's envelope. What is not given is a new command's: a fresh command
    id, which is also its correlation and causation id; issued now."""
    command_id = given.get("command_id") or str(uuid.uuid4())
    return {
        "command_id": command_id,
        "correlation_id": given.get("correlation_id") or command_id,
        "causation_id": given.get("causation_id") or command_id,
        "user_id": given.get("user_id"),
        "issued_at": given.get("issued_at") or datetime.now(UTC),
        "expected_version": given.get("expected_version"),
    }


@dataclass(frozen=True, slots=True)
class FramedCommand:
    """A command as it goes on the wire: Confluent-framed Avro, keyed by aggregate
    id, on the aggregate's murmur2 partition, with routing headers."""

    topic: str
    key: bytes
    partition: int
    value: bytes
    headers: Headers

    def send_with(self, send: Callable[..., object], **options: Any) -> None:
        """Hand it to ``send``: a producer's ``produce`` (``options``: e.g.
        ``on_delivery``), or a transactional batch's ``send``."""
        send(
            self.topic,
            self.value,
            key=self.key,
            partition=self.partition,
            headers=self.headers,
            **options,
        )


def frame_command(
    settings: Settings, codec: Codec, command: Any, envelope: Mapping[str, Any]
) -> FramedCommand:
    """Frame ``command`` with ``envelope`` (see ``new_envelope``): the one way
    Streamfold builds a command for Kafka (the client, the saga, HTTP commands)."""
    topic = settings.topics.commands(area_of(command))
    name = codec.catalog.record_name(type(command))
    value = codec.encode(topic, name, mapper.command_record(command, dict(envelope)))
    key = aggregate_id_of(command).encode()
    return FramedCommand(
        topic=topic,
        key=key,
        partition=partition_for(key, settings.partitions),
        value=value,
        headers=headers.for_command(
            command_type=type(command).__name__,
            command_id=envelope["command_id"],
            correlation_id=envelope["correlation_id"],
        ),
    )


class CommandClient:
    """Sends commands and waits for results. Not thread-safe; one per thread."""

    def __init__(
        self, settings: Settings, *, catalog: SchemaCatalog | None = None
    ) -> None:
        self.settings = settings
        self.catalog = catalog or SchemaCatalog.load()
        self.codec = Codec(
            ConfluentRegistry(settings.schema_registry_url), self.catalog
        )
        self.producer = Producer(
            {**settings.producer_config(), "linger.ms": 2, "partitioner": PARTITIONER}
        )
        self.results: dict[str, CommandResult] = {}
        self._consumer: Consumer | None = None

    def _listen(self) -> Consumer:
        """Start listening at the current end of command-results, before producing."""
        if self._consumer is None:
            consumer = Consumer(
                {
                    **self.settings.consumer_config(),
                    "group.id": f"streamfold-client-{uuid.uuid4()}",
                    "fetch.wait.max.ms": 500,
                    "enable.auto.commit": False,
                }
            )
            topic = self.settings.topics.results
            # A deployment's topics may have been created a moment ago: their
            # partitions are asked for again until they have leaders.
            consumer.assign(
                [
                    TopicPartition(topic, p, end)
                    for p, end in end_offsets(consumer, topic).items()
                ]
            )
            self._consumer = consumer
        return self._consumer

    def submit(self, command: Any, **given: Unpack[EnvelopeFields]) -> str:
        """Produce one command; returns its command id. Call ``flush`` or ``wait``."""
        self._listen()
        envelope = new_envelope(**given)
        framed = frame_command(self.settings, self.codec, command, envelope)
        framed.send_with(self.producer.produce)
        self.producer.poll(0)
        return str(envelope["command_id"])

    def flush(self, timeout: float = 30.0) -> None:
        if self.producer.flush(timeout) > 0:
            raise CommandTimeout(
                f"commands not acknowledged by Kafka within {timeout}s"
            )

    def wait(
        self, command_ids: Iterable[str], timeout: float | None = None
    ) -> list[CommandResult]:
        """Wait for the results of these commands, in the order given."""
        wanted = list(command_ids)
        self.flush()
        consumer = self._listen()
        deadline = time.monotonic() + (timeout or self.settings.command_timeout_s)
        missing = {c for c in wanted if c not in self.results}
        while missing:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise CommandTimeout(
                    f"no result for {len(missing)} command(s) within the timeout, "
                    f"e.g. {sorted(missing)[0]}"
                )
            # ``consume`` waits out its whole timeout unless the batch fills, so
            # wait for one result, then take what else has arrived.
            for message in take(consumer, 501, min(remaining, 0.5)):
                if message.error():
                    raise KafkaException(message.error())
                result = CommandResult.from_record(
                    self.codec.decode(message.value() or b"").data
                )
                self.results.setdefault(result.command_id, result)
                missing.discard(result.command_id)
        return [self.results[c] for c in wanted]

    def send(
        self,
        command: Any,
        timeout: float | None = None,
        **given: Unpack[EnvelopeFields],
    ) -> CommandResult:
        """Produce one command and wait for its result."""
        command_id = self.submit(command, **given)
        return self.wait([command_id], timeout)[0]

    def close(self) -> None:
        self.producer.flush(10)
        if self._consumer is not None:
            self._consumer.close()
            self._consumer = None

    def __enter__(self) -> CommandClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
