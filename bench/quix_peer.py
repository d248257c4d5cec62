"""The Quix Streams peer: the work Streamfold's worker does per command, as an
exactly-once Quix Streams application with per-key RocksDB state, run as
``python -m bench.quix_peer READY_FILE`` by bench.commands.

Configured as the worker's transactional processor is (exactly-once, read_committed,
the product's producer settings and key partitioner, transactions of at most the
worker's batch size), it takes each command in turn as the worker does: it decodes
the Avro command with the project's codec (schema registry), turns it into the
domain command, and has the project's ``CommandService`` decide it with the
accounts decider over a store that is Quix's state for the command's key. That
looks up the answer kept for the command id (a repeated command gets that answer
again and changes nothing), reads the account's state (as JSON via
``mapper.to_dict``) and version, decides, and stamps the events. The peer then
encodes each event and the ``streamfold.CommandResult`` with the codec (as the
worker does), writes the state the events lead to and the encoded result as the
command's answer, and produces the events (with the worker's event headers) to an
events-like topic and the result (with the worker's result headers) to a
results-like topic. Outputs, state changelog records and input offsets commit in
one Kafka transaction per checkpoint.

What it leaves out: the worker's in-memory cache of states, re-routing of commands
on another partition than their aggregate's, dead letters (every benchmark command
decodes), and the events' position in the result (Quix produces asynchronously, so
a result's ``partition``/``offset`` are left empty). Results are keyed by the
account id, on the command's partition, rather than by command id.
"""

from __future__ import annotations

import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict

from confluent_kafka import ConsumerGroupState, KafkaException
from quixstreams import Application, State
from quixstreams.kafka import ConnectionConfig
from quixstreams.models import Topic

from app.adapters import mapper, topics
from app.adapters.catalog import SchemaCatalog
from app.adapters.codec import Codec, ConfluentRegistry, Headers
from app.adapters.eventlog import encode_event, encode_result, result_headers
from app.application.commands import CommandService, VersionedState
from app.client import PARTITIONER
from app.runtime import AGGREGATES, envelope_from_record
from app.settings import Settings
from bench.common import baseline_topics

# Its topics are named after this (see ``baseline_topics``).
KIND = "quix"
# The worker's processor: how long a poll waits for more commands before the
# transaction holding what it has is committed.
POLL_WAIT_S = 0.05
# The key's state and a command's answer, under the key's prefix in the store.
STATE = "state"
ANSWER = "answer/"
# The benchmark's commands are the accounts aggregate's.
AGGREGATE = AGGREGATES["accounts"]


class SavedState(TypedDict):
    """What the store keeps under ``STATE``: the state as ``mapper.to_dict`` gives
    it, and its version."""

    state: dict[str, Any]
    version: int


@dataclass(slots=True)
class QuixStore:
    """``CommandService``'s store over Quix's state for the message's key (the
    account id): the account's state as JSON with its version, and each answer, as
    sent, by command id. Quix keeps the writes in the checkpoint's transaction."""

    state: State[str, SavedState]
    state_type: type

    def load(self, aggregate_id: str) -> VersionedState | None:
        raw = self.state.get(STATE)
        if raw is None:
            return None
        return VersionedState(
            state=mapper.from_dict(self.state_type, raw["state"]),
            version=raw["version"],
        )

    def save(self, aggregate_id: str, versioned: VersionedState) -> None:
        self.state.set(
            STATE,
            {"state": mapper.to_dict(versioned.state), "version": versioned.version},
        )

    def answered(self, command_id: str) -> bytes | None:
        return self.state.get_bytes(ANSWER + command_id)

    def remember(self, command_id: str, answer: bytes) -> None:
        self.state.set_bytes(ANSWER + command_id, answer)


@dataclass(frozen=True, slots=True)
class Taker:
    """One command on its key's state, as the worker's command handler takes it."""

    codec: Codec
    events_topic: str
    results_topic: str

    def __call__(
        self,
        value: bytes,
        key: bytes,
        timestamp: int,
        headers: Any,
        state: State[str, SavedState],
    ) -> dict[str, Any]:
        """The events to produce, each with its headers (none for a repeated or
        rejected command), and the answer with its headers."""
        codec = self.codec
        decoded = codec.decode(value)
        cls = codec.catalog.class_for(decoded.record_name)
        if cls not in AGGREGATE.decider.COMMANDS:
            raise ValueError(f"{decoded.record_name} is not an accounts command")
        envelope_data, payload = mapper.split_command(decoded.data)
        envelope = envelope_from_record(envelope_data)
        command: object = mapper.from_dict(cls, payload)
        store = QuixStore(state, type(AGGREGATE.initial_state()))
        service = CommandService(aggregate=AGGREGATE, store=store)
        decision = service.decide(envelope, command)
        if decision.repeat is not None:
            return {"events": [], "answer": (decision.repeat, [])}
        result = decision.result
        assert result is not None
        events: list[tuple[bytes, Headers]] = []
        for new in decision.events:
            event_value, event_headers, _ = encode_event(codec, self.events_topic, new)
            events.append((event_value, event_headers))
        # Only once every event is encoded, as the worker does.
        service.apply(decision)
        answer = encode_result(codec, self.results_topic, result)
        store.remember(result.command_id, answer)
        return {"events": events, "answer": (answer, result_headers(result))}


def _headers(value: tuple[bytes, Headers], key: Any, timestamp: int, _: Any) -> Any:
    return value[1]


def build(settings: Settings, state_dir: Path) -> Application:
    names = baseline_topics(settings, KIND)
    session_ms = int(settings.session_timeout_s * 1000)
    app = Application(
        broker_address=ConnectionConfig.from_librdkafka_dict(
            settings.kafka_client_config()
        ),
        # An application id of its own per run (bench.commands), so a group of its own.
        consumer_group=settings.app_id,
        processing_guarantee="exactly-once",
        auto_offset_reset="earliest",
        commit_every=settings.command_batch,
        commit_interval=POLL_WAIT_S,
        consumer_poll_timeout=POLL_WAIT_S,
        state_dir=state_dir,
        loglevel="WARNING",
        consumer_extra_config={
            "isolation.level": "read_committed",
            "fetch.wait.max.ms": 10,
            "session.timeout.ms": session_ms,
            "heartbeat.interval.ms": max(session_ms // 10, 500),
        },
        producer_extra_config={
            "acks": "all",
            "linger.ms": 1,
            # The producer's partitioner: an event lands on its command's partition.
            "partitioner": PARTITIONER,
            "message.max.bytes": 2 * settings.max_message_bytes + 65_536,
        },
    )

    def raw(name: str) -> Topic:
        return app.topic(
            name,
            key_deserializer="bytes",
            value_deserializer="bytes",
            key_serializer="bytes",
            value_serializer="bytes",
        )

    commands = raw(names["commands"])
    events = raw(names["events"])
    results = raw(names["results"])

    # As the worker builds its codec (app.writeside).
    codec = Codec(ConfluentRegistry(settings.schema_registry_url), SchemaCatalog.load())
    take = Taker(codec, names["events"], names["results"])
    taken = app.dataframe(commands).apply(take, stateful=True, metadata=True)
    # Each event with the worker's event headers, keyed by the account id.
    (
        taken.apply(lambda t: t["events"], expand=True)
        .set_headers(_headers)
        .apply(lambda e: e[0])
        .to_topic(events)
    )
    # The answer with the worker's result headers.
    (
        taken.apply(lambda t: t["answer"])
        .set_headers(_headers)
        .apply(lambda a: a[0])
        .to_topic(results)
    )
    return app


def assigned(settings: Settings, group: str, topic: str) -> bool:
    """Every partition of ``topic`` is assigned to a member of the stable ``group``."""
    admin = topics.admin_client(settings)
    try:
        group_state = admin.describe_consumer_groups([group])[group].result(timeout=30)
        partitions = admin.list_topics(topic, timeout=30).topics[topic].partitions
    except KafkaException:
        return False
    if group_state.state != ConsumerGroupState.STABLE:
        return False
    owned = {
        tp.partition
        for member in group_state.members
        if member.assignment is not None
        for tp in member.assignment.topic_partitions
        if tp.topic == topic
    }
    return bool(partitions) and owned >= set(partitions)


def signal_ready(
    settings: Settings, ready: Path, stopping: threading.Event, topic: str
) -> None:
    while not stopping.wait(0.2):
        if assigned(settings, settings.app_id, topic):
            ready.write_text("ready")
            return


def delete_internal_topics(settings: Settings) -> None:
    """The application's changelog (and any repartition) topics: named
    ``<type>__<consumer group>--…``, so outside the prefix bench.commands deletes."""
    admin = topics.admin_client(settings)
    mine = f"__{settings.app_id}--"
    names = [
        name
        for name in admin.list_topics(timeout=30).topics
        if name.startswith(("changelog" + mine, "repartition" + mine))
    ]
    if names:
        for future in admin.delete_topics(names, operation_timeout=30).values():
            try:
                future.result(timeout=30)
            except KafkaException:
                continue


def main(argv: list[str]) -> int:
    settings = Settings.from_env()
    ready = Path(argv[0])
    stopping = threading.Event()
    try:
        with tempfile.TemporaryDirectory(prefix="quix-peer-") as state_dir:
            app = build(settings, Path(state_dir))
            watcher = threading.Thread(
                target=signal_ready,
                args=(
                    settings,
                    ready,
                    stopping,
                    baseline_topics(settings, KIND)["commands"],
                ),
                daemon=True,
            )
            watcher.start()
            try:
                # Until SIGTERM (bench.commands), which stops it cleanly.
                app.run()
            finally:
                stopping.set()
    finally:
        delete_internal_topics(settings)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
