"""The Quix Streams peer: the least work an exactly-once Quix Streams application with
per-key RocksDB state does per command, run as ``python -m bench.quix_peer READY_FILE``
by bench.commands.

Configured as the worker's transactional processor is (exactly-once, read_committed,
the product's producer settings and key partitioner, transactions of at most the
worker's batch size), it takes each command in turn: it looks up the answer kept
for the command id (a repeated command gets that answer again and changes
nothing), reads its key's state, writes the command's bytes as the key's new state
and the command id as the command's answer, and produces the command's bytes to an
events-like topic and the command id to a results-like topic. Outputs, state
changelog records and input offsets commit in one Kafka transaction per
checkpoint. It decodes, decides and answers nothing.
"""

from __future__ import annotations

import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

from confluent_kafka import ConsumerGroupState, KafkaException
from quixstreams import Application, State
from quixstreams.kafka import ConnectionConfig

from app.adapters import topics
from app.adapters.codec import COMMAND_ID_HEADER
from app.client import PARTITIONER
from app.settings import Settings
from bench.common import baseline_topics

# Its topics are named after this (see ``baseline_topics``).
KIND = "quix"
# The worker's processor: how long a poll waits for more commands before the
# transaction holding what it has is committed.
POLL_WAIT_S = 0.05
# The key's state and a command's answer, under the key's prefix in the store.
RECORD = "record"
ANSWER = "answer/"


def take(
    value: bytes, key: bytes, timestamp: int, headers: Any, state: State
) -> dict[str, bytes | None]:
    """One command on its key's state: the event to produce (none for a repeated
    command) and the answer."""
    command_id: bytes = dict(headers or [])[COMMAND_ID_HEADER]
    answer_key = ANSWER + command_id.decode()
    answered = state.get_bytes(answer_key)
    if answered is not None:
        return {"event": None, "answer": answered}
    state.get_bytes(RECORD)
    state.set_bytes(RECORD, value)
    state.set_bytes(answer_key, command_id)
    return {"event": value, "answer": command_id}


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
    raw = {
        "key_deserializer": "bytes",
        "value_deserializer": "bytes",
        "key_serializer": "bytes",
        "value_serializer": "bytes",
    }
    commands = app.topic(names["commands"], **raw)
    events = app.topic(names["events"], **raw)
    results = app.topic(names["results"], **raw)

    taken = app.dataframe(commands).apply(take, stateful=True, metadata=True)
    # Events and results carry no headers, as the other loops' do not.
    taken = taken.set_headers(lambda value, key, timestamp, headers: [])
    taken.filter(lambda t: t["event"] is not None).apply(lambda t: t["event"]).to_topic(
        events
    )
    taken.apply(lambda t: t["answer"]).to_topic(results)
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
