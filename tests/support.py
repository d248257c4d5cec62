"""Helpers for tests against the real services: workers, and reading whole topics."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, LiteralString

import httpx
import psycopg

from app.adapters.codec import Codec
from app.audit import (  # noqa: F401 - re-exported for the tests
    events_by_aggregate,
    new_codec,
    read_topic,
    results_by_command,
)
from app.client import CommandClient
from app.domain.orders import CreateOrder, LineItem
from app.local.process import Daemon
from app.local.worker import WorkerProcess
from app.settings import Settings
from app.waiting import eventually
from app.workload import new_order

README = Path(__file__).resolve().parents[1] / "README.md"


def codec_for(settings: Settings) -> Codec:
    return new_codec(settings)


@contextmanager
def running_worker(settings: Settings, name: str = "worker") -> Iterator[Daemon]:
    worker = WorkerProcess(settings, name)
    worker.start(timeout=120)
    try:
        yield worker
    finally:
        worker.stop()


def get_until(url: str, until: Any, timeout: float = 30.0) -> httpx.Response:
    """GET `url` until `until(response)` holds or `timeout` passes; the last response.

    Views are eventually consistent: a test waits for the state it expects, then
    asserts on what the view returned."""
    return eventually(
        lambda: httpx.get(url, timeout=10), until, timeout=timeout, every=0.2
    )


def query_rows(
    database_url: str, query: LiteralString, *params: Any
) -> list[tuple[Any, ...]]:
    """Every row ``query`` returns, on a connection of its own (closed after)."""
    with psycopg.connect(database_url) as conn:
        return conn.execute(query, params).fetchall()


def eventually_equal(
    actual: Callable[[], Any], expected: Any, timeout: float = 60.0
) -> None:
    """Waits until ``actual()`` equals ``expected``, then asserts that it does (so a
    wait that fails shows the last value beside the expected one)."""
    value = eventually(actual, lambda v: v == expected, timeout=timeout, every=0.3)
    assert value == expected


def create_order(order_id: str, customer: str) -> CreateOrder:
    """A one-item order in USD (42.00), to the workload's default address, for tests
    that need an order to exist."""
    return new_order(
        order_id,
        customer,
        (LineItem(product_id="cobol", quantity=1, unit_price_minor=4200),),
        name="Grace Hopper",
        email="grace@example.com",
    )


def submit_paced(
    client: CommandClient, work: Sequence[tuple[str, Any]], rate: float
) -> None:
    """Submits ``work``, (command id, command) pairs, at a steady ``rate`` a second."""
    started = time.monotonic()
    for n, (command_id, command) in enumerate(work):
        delay = started + n / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        client.submit(command, command_id=command_id)


def run_cli(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    """``streamfold ARGS`` against ``settings``' deployment, its output captured."""
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *args],
        env={**os.environ, **settings.as_env()},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


# An order's JSON body as the HTTP routes and the GraphQL mutations take it, but
# its order id.
ORDER = {
    "customer_id": "cust-1",
    "customer_name": "Ada Lovelace",
    "customer_email": "ada@example.com",
    "items": [
        {"product_id": "tea", "quantity": 2, "unit_price_minor": 450},
        {
            "product_id": "cake",
            "quantity": 1,
            "unit_price_minor": 300,
            "tax_rate_bps": 0,
        },
    ],
    "currency": "USD",
    "shipping_address": {
        "street": "1 Analytical Way",
        "city": "London",
        "state": "",
        "zip_code": "N1",
        "country": "GB",
    },
}


def readme_block(heading: str, language: str) -> str:
    """The README's first ``language`` code block after ``heading``."""
    text = README.read_text()
    after = text[text.index(heading) :]
    return after.split(f"```{language}\n", 1)[1].split("```", 1)[0]


def console_commands(block: str) -> list[tuple[list[str], str]]:
    """(argv, output) for every ``$ `` line in a console ``block``, the command's
    continuation lines joined and its ``#`` comment dropped."""
    found: list[tuple[list[str], list[str]]] = []
    lines = iter(block.splitlines())
    for line in lines:
        if line.startswith("$ "):
            command = line[2:]
            while command.endswith("\\"):
                command = command[:-1] + next(lines).strip()
            found.append((shlex.split(command, comments=True), []))
        elif found:
            found[-1][1].append(line)
    return [(argv, "\n".join(output)) for argv, output in found]


def as_run_here(argv: list[str], account_id: str, base: str) -> list[str]:
    """A README curl command against ``base`` (``http://host:port``), with the
    README's account id replaced by ``account_id``."""
    return [
        re.sub(r"acc-[0-9a-f]{6}", account_id, a).replace("http://127.0.0.1:6066", base)
        for a in argv
    ]


def rewind_group(settings: Settings, group: str, topics: Sequence[str]) -> None:
    """Every partition of ``topics`` back to offset 0 for ``group``, as
    ``kafka-consumer-groups --reset-offsets --to-earliest`` does. The group must have
    no member: a stopped worker's processors are static members, which stay until
    their session times out, and the broker refuses the reset until then (per
    partition: UNKNOWN_MEMBER_ID)."""
    from confluent_kafka import ConsumerGroupTopicPartitions, TopicPartition
    from confluent_kafka.admin import AdminClient

    config: dict[str, str | int | float | bool] = {**settings.kafka_client_config()}
    admin = AdminClient(config)
    partitions = [
        TopicPartition(topic, p, 0)
        for topic in topics
        for p in range(settings.partitions)
    ]

    def reset() -> list[str]:
        request = ConsumerGroupTopicPartitions(group, partitions)
        done = admin.alter_consumer_group_offsets([request])[group].result(timeout=30)
        return [
            f"{tp.topic}[{tp.partition}]: {tp.error}"
            for tp in done.topic_partitions
            if tp.error
        ]

    refused = eventually(
        reset, lambda r: not r, timeout=3 * settings.session_timeout_s, every=1.0
    )
    assert not refused, f"{group} not rewound: {refused}"


class Consumed:
    """A consumed record for code that reads one without a broker (as much of
    confluent_kafka's ``Message`` as the processor and handlers read first)."""

    def __init__(
        self,
        topic: str,
        partition: int,
        offset: int,
        value: bytes = b"",
        key: bytes = b"k",
    ) -> None:
        self.where = (topic, partition, offset)
        self.data = (key, value)

    def error(self) -> None:
        return None

    def topic(self) -> str:
        return self.where[0]

    def partition(self) -> int:
        return self.where[1]

    def offset(self) -> int:
        return self.where[2]

    def key(self) -> bytes:
        return self.data[0]

    def value(self) -> bytes:
        return self.data[1]

    def headers(self) -> list[tuple[str, bytes]]:
        return []
