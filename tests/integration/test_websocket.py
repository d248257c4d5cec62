"""WebSocket push (``/ws``) against a real worker: what each subscription sees, resuming
after a disconnect and after a worker restart, a slow client, bad requests."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from confluent_kafka import Producer
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from app.adapters.eventlog import partition_for
from app.client import CommandClient
from app.domain import accounts
from app.domain.accounts import OpenAccount
from app.domain.orders import ShipOrder
from app.history import EventLogProjection
from app.local import deployments
from app.local.process import Daemon
from app.push.hub import TOO_SLOW, TRY_AGAIN_LATER
from app.readside import ReadSide
from app.settings import Settings
from app.waiting import eventually
from app.workload import deposit, payment
from bench.harness import domain_events, encode_events
from tests.invariants import serving_worker, start_serving
from tests.support import codec_for, create_order, get_until, query_rows

# One module-scoped worker (see ``pushing``): the module's tests run in one process.
pytestmark = [pytest.mark.xdist_group(__name__), pytest.mark.slow]

# RFC 6455's close code for a message over the server's limit (64 KiB here).
MESSAGE_TOO_BIG = 1009
# Every wait below is a deadline for something that must happen, never a measure.
WAIT_S = 60.0


@dataclasses.dataclass
class Pushing:
    settings: Settings
    worker: Daemon

    @property
    def url(self) -> str:
        return f"ws://{self.settings.web_host}:{self.settings.web_port}/ws"

    def status(self) -> dict[str, Any]:
        base = self.settings.web_url
        return dict(httpx.get(f"{base}/status", timeout=10).json()["push"])

    async def send(self, *commands: Any, **envelope: Any) -> None:
        """Send ``commands``, each accepted, from a thread: the loop goes on
        receiving meanwhile."""
        await asyncio.to_thread(sent, self.settings, *commands, **envelope)

    @asynccontextmanager
    async def client(self) -> AsyncIterator[Client]:
        """A connection to the worker's ``/ws``, closed on leaving."""
        async with connect(self.url) as socket:
            yield Client(socket)


@pytest.fixture(scope="module")
def pushing(registry_settings: Settings) -> Iterator[Pushing]:
    """One worker for the module, with small limits so that tests reach them. Of
    the projections only the event-log index runs: aggregate subscriptions' views
    are seeded from it (waiting for it as long as a test may wait)."""
    settings = dataclasses.replace(
        deployments.create(registry_settings),
        projections=("event_log",),
        query_wait_s=WAIT_S,
        saga=False,
        ws_queue=1_000,
        ws_max_subscriptions=3,
        ws_max_connections=4,
    )
    try:
        with serving_worker(settings) as worker:
            yield Pushing(settings, worker)
    finally:
        deployments.remove(settings)


class Client:
    """A WebSocket client that keeps the events of each subscription apart from
    the answers to its requests."""

    def __init__(self, socket: ClientConnection) -> None:
        self.socket = socket
        self.events: dict[str, list[dict[str, Any]]] = {}
        self.answers: list[dict[str, Any]] = []

    async def _next(self) -> None:
        message = json.loads(await asyncio.wait_for(self.socket.recv(), WAIT_S))
        if message["type"] == "event":
            self.events.setdefault(message["subscription"], []).append(message)
        else:
            self.answers.append(message)

    async def ask(self, **request: Any) -> dict[str, Any]:
        """Send a request; the ack or error it gets."""
        await self.socket.send(json.dumps(request))
        return await self.answer()

    async def subscribe(
        self, name: str, start: dict[str, Any] | None = None, **selector: Any
    ) -> dict[str, Any]:
        """Subscribe ``name`` to the events ``selector`` picks (from ``start``, a
        position, if given); the ack, which it must be."""
        request: dict[str, Any] = {"type": "subscribe", "id": name, **selector}
        if start is not None:
            request["from"] = start
        ack = await self.ask(**request)
        assert ack["type"] == "ack", (request, ack)
        return ack

    async def unsubscribe(self, name: str) -> None:
        answer = await self.ask(type="unsubscribe", id=name)
        assert answer["type"] == "ack", answer

    async def answer(self) -> dict[str, Any]:
        while not self.answers:
            await self._next()
        return self.answers.pop(0)

    async def read_to_close(self) -> None:
        """Take every message until the connection closes (which raises)."""
        while True:
            await self._next()

    async def until(self, subscription: str, count: int) -> list[dict[str, Any]]:
        """The subscription's events once it has ``count`` of them."""
        while len(self.events.get(subscription, [])) < count:
            await self._next()
        return self.events[subscription]


def versions(events: list[dict[str, Any]]) -> list[int]:
    return [e["metadata"]["stream_version"] for e in events]


def sent(settings: Settings, *commands: Any, **envelope: Any) -> None:
    with CommandClient(settings) as client:
        for command in commands:
            assert client.send(command, timeout=WAIT_S, **envelope).accepted


def opened(account: str) -> tuple[Any, ...]:
    """Open ``account`` and deposit 1, then 2."""
    return (
        OpenAccount(account_id=account, owner_id="o", currency="USD"),
        deposit(account, 1, "t1"),
        deposit(account, 2, "t2"),
    )


def indexed(settings: Settings, account: str, count: int) -> None:
    """Wait until the event-log index has ``count`` events of ``account``."""
    base = settings.web_url
    shown = get_until(
        f"{base}/query/history/{account}?type=account",
        lambda r: r.status_code == 200 and len(r.json()["events"]) == count,
        WAIT_S,
    )
    assert len(shown.json()["events"]) == count, shown.text


def index_caught_up(settings: Settings, topic: str, partition: int) -> None:
    """Wait until the event-log index has applied every event of one partition of
    ``topic`` (its position at the partition's head, as ``/status`` shows it)."""

    def position() -> dict[str, Any] | None:
        status = httpx.get(f"{settings.web_url}/status", timeout=10).json()
        (index,) = [
            p for p in status["projections"] if p["name"] == EventLogProjection.name
        ]
        return next(
            (
                q
                for q in index["positions"]
                if (q["topic"], q["partition"]) == (topic, partition)
            ),
            None,
        )

    shown = eventually(
        position,
        lambda q: (
            q is not None and q["head"] is not None and q["next_offset"] >= q["head"]
        ),
        timeout=WAIT_S,
        every=0.2,
    )
    assert shown is not None and shown["next_offset"] >= shown["head"], shown


def ids() -> tuple[str, str]:
    run = uuid.uuid4().hex[:6]
    return f"acc-{run}", f"acc-other-{run}"


def test_an_aggregate_subscriber_sees_its_events_once_and_no_others(
    pushing: Pushing,
) -> None:
    mine, other = ids()
    settings = pushing.settings

    async def scenario() -> None:
        async with pushing.client() as client:
            ack = await client.subscribe("mine", aggregate_id=mine)
            assert ack["id"] == "mine"
            assert set(ack["position"]) == {
                settings.topics.events("orders"),
                settings.topics.events("accounts"),
            }
            await client.subscribe("other", aggregate_id=other)
            await pushing.send(
                OpenAccount(account_id=mine, owner_id="o", currency="USD"),
                OpenAccount(account_id=other, owner_id="o", currency="USD"),
                deposit(mine, 100, "t1"),
                deposit(other, 5, "t1"),
                deposit(mine, 250, "t2"),
                deposit(other, 6, "t2"),
            )
            got = await client.until("mine", 3)
            # The other account's events have passed the feed: its subscriber has
            # them all. Whatever else went to "mine" was queued before this ack.
            await client.until("other", 3)
            await client.unsubscribe("mine")
            await client.unsubscribe("other")
            got = client.events["mine"]
            assert [e["metadata"]["aggregate_id"] for e in got] == [mine] * 3
            assert versions(got) == [1, 2, 3]
            assert [e["event_type"] for e in got] == [
                "AccountOpened",
                "MoneyDeposited",
                "MoneyDeposited",
            ]
            assert got[2]["data"]["balance_after_minor"] == 350
            # The account's view after each event, as GET /accounts/{id} shows it.
            assert [e["view"]["balance_minor"] for e in got] == [0, 100, 350]
            first = got[0]["position"]
            assert first["topic"] == settings.topics.events("accounts")
            assert first["partition"] == partition_for(mine.encode(), 4)
            resume = got[-1]["resume"][first["topic"]][str(first["partition"])]
            assert resume == got[-1]["position"]["offset"] + 1
            # The fan-out's own CPU, as /status counts it: the feed's thread has
            # polled, the loop has dispatched.
            spent = (await asyncio.to_thread(pushing.status))["cpu_s"]
            assert spent["feed"] > 0 and spent["dispatch"] > 0

    asyncio.run(scenario())


def test_correlation_and_event_type_subscriptions(pushing: Pushing) -> None:
    run = uuid.uuid4().hex[:6]
    order, account, stray = f"ord-{run}", f"acc-{run}", f"ord-stray-{run}"
    correlation = f"corr-{run}"

    async def scenario() -> None:
        async with pushing.client() as client:
            await client.subscribe("flow", correlation_id=correlation)
            await client.subscribe("shipped", event_type="OrderShipped")
            await pushing.send(
                create_order(order, "c-1"),
                OpenAccount(account_id=account, owner_id="o", currency="USD"),
                correlation_id=correlation,
            )
            await pushing.send(
                create_order(stray, "c-2"),
                payment(stray, 4200, "p", "t", method="paypal"),
                ShipOrder(order_id=stray, tracking_number="1Z2", carrier="UPS"),
                payment(order, 4200, "p", "t", method="paypal"),
                ShipOrder(order_id=order, tracking_number="1Z1", carrier="UPS"),
                correlation_id=f"elsewhere-{run}",
            )
            shipped = await client.until("shipped", 2)
            flow = await client.until("flow", 2)
            await client.unsubscribe("flow")
            await client.unsubscribe("shipped")
        assert sorted(
            (e["metadata"]["aggregate_id"], e["event_type"]) for e in flow
        ) == [
            (account, "AccountOpened"),
            (order, "OrderCreated"),
        ]
        assert {e["metadata"]["correlation_id"] for e in flow} == {correlation}
        assert sorted(e["metadata"]["aggregate_id"] for e in shipped) == [order, stray]
        assert {e["event_type"] for e in shipped} == {"OrderShipped"}
        # The fields of the newest OrderCreated (v3), whatever version wrote it.
        [created] = [e for e in flow if e["event_type"] == "OrderCreated"]
        assert created["data"]["customer_name"] == "Grace Hopper"
        assert created["record_name"] == "streamfold.orders.OrderCreated"

    asyncio.run(scenario())


def assert_views(events: list[dict[str, Any]]) -> None:
    """Each event of the account (opened, then deposits of 1, 2, 3, ...) carries
    the account's view after it."""
    assert [
        (e["view"]["version"], e["view"]["status"], e["view"]["balance_minor"])
        for e in events
    ] == [(v, "OPEN", sum(range(1, v))) for v in versions(events)], events


def test_resume_after_a_disconnect_misses_and_repeats_nothing(
    pushing: Pushing,
) -> None:
    account, _ = ids()

    async def scenario() -> None:
        async with pushing.client() as client:
            await client.subscribe("s", aggregate_id=account)
            await pushing.send(
                OpenAccount(account_id=account, owner_id="o", currency="USD"),
                deposit(account, 1, "t1"),
            )
            before = await client.until("s", 2)
        # Disconnected: these arrive while no one listens.
        await pushing.send(*(deposit(account, n, f"t{n}") for n in range(2, 6)))
        async with pushing.client() as client:
            ack = await client.subscribe(
                "s", before[-1]["resume"], aggregate_id=account
            )
            assert ack["position"] == before[-1]["resume"]
            backlog = await client.until("s", 4)
            await pushing.send(deposit(account, 6, "t6"))
            after = await client.until("s", 5)
            await client.unsubscribe("s")
        assert versions(before) == [1, 2]
        assert versions(backlog[:4]) == [3, 4, 5, 6]
        assert versions(after) == [3, 4, 5, 6, 7]
        assert [e["data"]["amount_minor"] for e in after] == [2, 3, 4, 5, 6]
        # Resumed after the account's first event: the view after each event all
        # the same, as if the subscription had seen every event.
        assert_views(before + after)

        # Resuming while deposits go on: the backlog is read while the feed moves,
        # and the subscription joins the feed with neither a gap nor a repeat. A
        # watcher says when the deposits are flowing.
        async with pushing.client() as watcher, pushing.client() as client:
            await watcher.subscribe("w", aggregate_id=account)
            writing = asyncio.ensure_future(
                pushing.send(*(deposit(account, n, f"t{n}") for n in range(7, 47)))
            )
            await watcher.until("w", 5)
            await client.subscribe("s", after[-1]["resume"], aggregate_id=account)
            await writing
            during = await client.until("s", 40)
            await client.unsubscribe("s")
            # Joined from now, after seven of the account's events.
            watched = await watcher.until("w", 40)
        assert versions(during) == list(range(8, 48))
        assert_views(during)
        assert watched[0]["metadata"]["stream_version"] > 1
        assert_views(watched)
        # The last view is the one GET /accounts/{id} shows once it has the event.
        base = pushing.settings.web_url
        shown = await asyncio.to_thread(
            get_until,
            f"{base}/accounts/{account}",
            lambda r: r.status_code == 200 and r.json()["version"] == 47,
        )
        assert shown.status_code == 200 and shown.json()["version"] == 47, shown.text
        last = during[-1]["view"]
        assert {k: shown.json()[k] for k in last} == last

        # From the log's start: every event, and the account's view after each.
        zeros = {t: dict.fromkeys(p, 0) for t, p in after[-1]["resume"].items()}
        async with pushing.client() as client:
            await client.subscribe("s", zeros, aggregate_id=account)
            whole = await client.until("s", 47)
        assert versions(whole) == list(range(1, 48))
        balances = [e["view"]["balance_minor"] for e in whole]
        assert balances == [sum(range(1, n)) for n in range(1, 48)]

    asyncio.run(scenario())


def test_a_view_is_seeded_from_the_index_not_the_partition(pushing: Pushing) -> None:
    """A subscription made from now after an account's first events, in a
    partition that holds thousands of another account's events below them: its
    view is folded from the account's own events in the event-log index, and not
    one offset of the log is read for it."""
    settings = pushing.settings
    account, other = ids()
    topic = settings.topics.events("accounts")
    partition = partition_for(account.encode(), settings.partitions)
    crowd = encode_events(
        codec_for(settings),
        topic,
        domain_events(
            accounts,
            accounts.AGGREGATE_TYPE,
            [
                OpenAccount(account_id=other, owner_id="o", currency="USD"),
                *(deposit(other, 1, f"t{n}") for n in range(3_000)),
            ],
            start=datetime.now(UTC),
        ),
    )
    producer = Producer(settings.producer_config())
    for record in crowd:
        producer.produce(
            topic, record.value, record.key, partition=partition, headers=record.headers
        )
    assert producer.flush(30) == 0

    async def scenario() -> tuple[dict[str, Any], list[dict[str, Any]]]:
        async with pushing.client() as client:
            await client.subscribe("w", aggregate_id=account)
            await pushing.send(*opened(account))
            # The feed has handed over the account's events, and the index has
            # them and every other event of the partition: the cursor below is
            # past them, and the index there (on a busy machine it could lag the
            # feed by another aggregate's event, which the seed then reads from
            # the log).
            await client.until("w", 3)
            await asyncio.to_thread(indexed, settings, account, 3)
            await asyncio.to_thread(index_caught_up, settings, topic, partition)
            ack = await client.subscribe("s", aggregate_id=account)
            await pushing.send(deposit(account, 3, "t3"))
            got = await client.until("s", 1)
            return ack, got

    seeded = pushing.status()["seeded"]
    ack, got = asyncio.run(scenario())
    delta = {k: v - seeded[k] for k, v in pushing.status()["seeded"].items()}
    # More than 3,000 offsets of the partition lie below the cursor.
    assert ack["position"][topic][str(partition)] > 3_000
    assert versions(got) == [4]
    assert_views(got)
    # Both subscriptions were seeded from the index: the watcher's with nothing
    # (the account had no events yet), the other's with the account's three.
    assert delta == {"from_index": 2, "index_events": 3, "log_offsets": 0}


def test_the_index_gives_an_aggregates_events_below_a_position(
    pushing: Pushing,
) -> None:
    """``ReadSide.index_below`` on the module's index: the aggregate's events
    below the position, or, past the wait, below where the index has got; nothing
    (the log is read) where the index does not run."""
    settings = pushing.settings
    account, _ = ids()
    sent(
        settings,
        *opened(account),
    )
    indexed(settings, account, 3)
    rows = query_rows(
        settings.query_database_url,
        'SELECT topic, partition, "offset" FROM event_log'
        ' WHERE aggregate_id = %s ORDER BY "offset"',
        account,
    )
    [tp] = {(str(t), int(p)) for t, p, _ in rows}
    offsets = [int(o) for _, _, o in rows]

    async def ask() -> list[Any]:
        waiting = ReadSide(settings, ("event_log",))
        # Not waiting at all: what the index holds when asked.
        hurried = ReadSide(
            dataclasses.replace(settings, query_wait_s=0.0), ("event_log",)
        )
        without = ReadSide(settings, ())
        try:
            return [
                await waiting.index_below(account, {tp: offsets[1] + 1}),
                await waiting.index_below(account, {tp: offsets[0] + 1}),
                await hurried.index_below(account, {tp: 10**12}),
                await without.index_below(account, {tp: offsets[1] + 1}),
            ]
        finally:
            for read in (waiting, hurried):
                await (await read.pool()).close()

    two, one, held, none = asyncio.run(ask())
    assert [m["stream_version"] for m, _ in two[0]] == [1, 2]
    assert two[1] == {tp: offsets[1] + 1}
    assert [d["balance_after_minor"] for _, d in two[0][1:]] == [1]
    assert isinstance(two[0][0][0]["timestamp"], datetime)
    assert [m["stream_version"] for m, _ in one[0]] == [1]
    assert one[1] == {tp: offsets[0] + 1}
    # Far past the index: all it holds, and where it stood (the log from there).
    assert [m["stream_version"] for m, _ in held[0]] == [1, 2, 3]
    assert offsets[2] < held[1][tp] < 10**12
    assert none is None


def test_bad_requests_get_an_error_naming_the_field(pushing: Pushing) -> None:
    settings = pushing.settings
    events = settings.topics.events("accounts")

    async def scenario() -> None:
        async with pushing.client() as client:
            full = (await client.subscribe("a", aggregate_id="x"))["position"]
            short = {t: dict(p) for t, p in full.items()}
            del short[events]["3"]
            cases: list[tuple[str | None, dict[str, Any] | str]] = [
                (None, "{not json"),
                (None, "[1, 2]"),
                ("type", {"type": "frob"}),
                ("id", {"type": "subscribe", "aggregate_id": "x"}),
                ("id", {"type": "subscribe", "id": "", "aggregate_id": "x"}),
                ("id", {"type": "subscribe", "id": 7, "aggregate_id": "x"}),
                ("aggregate_id", {"type": "subscribe", "id": "b"}),
                (
                    "event_type",
                    {
                        "type": "subscribe",
                        "id": "b",
                        "aggregate_id": "x",
                        "event_type": "OrderShipped",
                    },
                ),
                ("event_type", {"type": "subscribe", "id": "b", "event_type": "Nope"}),
                (
                    "aggregate_id",
                    {"type": "subscribe", "id": "b", "aggregate_id": "x\x00"},
                ),
                (
                    "colour",
                    {"type": "subscribe", "id": "b", "aggregate_id": "x", "colour": 1},
                ),
                (
                    "from",
                    {"type": "subscribe", "id": "b", "aggregate_id": "x", "from": 12},
                ),
                (
                    "from.nope",
                    {
                        "type": "subscribe",
                        "id": "b",
                        "aggregate_id": "x",
                        "from": {"nope": {}},
                    },
                ),
                (
                    f"from.{events}",
                    {
                        "type": "subscribe",
                        "id": "b",
                        "aggregate_id": "x",
                        "from": short,
                    },
                ),
                (
                    f"from.{events}.0",
                    {
                        "type": "subscribe",
                        "id": "b",
                        "aggregate_id": "x",
                        "from": {**full, events: {**full[events], "0": -1}},
                    },
                ),
                ("id", {"type": "subscribe", "id": "a", "aggregate_id": "y"}),
                ("id", {"type": "unsubscribe", "id": "never"}),
                # Past the log's end: checked at the broker, refused, not held.
                (
                    "from",
                    {
                        "type": "subscribe",
                        "id": "b",
                        "aggregate_id": "x",
                        "from": {**full, events: {**full[events], "0": 10**12}},
                    },
                ),
                (None, "[" * 3000),
            ]
            for field, request in cases:
                text = request if isinstance(request, str) else json.dumps(request)
                await client.socket.send(text)
                answer = await client.answer()
                assert answer["type"] == "error", (request, answer)
                assert answer["field"] == field, (request, answer)
                assert answer["error"]
            # At most 3 subscriptions (STREAMFOLD_WS_MAX_SUBSCRIPTIONS here).
            for name in ("b", "c"):
                await client.subscribe(name, aggregate_id=name)
            refused = await client.ask(type="subscribe", id="d", aggregate_id="d")
            assert (refused["type"], refused["field"], refused["id"]) == (
                "error",
                "id",
                "d",
            )
            # The connection is still open and answering.
            await client.unsubscribe("c")
            await client.subscribe("d", aggregate_id="d")

    asyncio.run(scenario())


def test_connections_beyond_the_limit_are_refused(pushing: Pushing) -> None:
    # The other tests' connections are gone (the worker counts them until then).
    idle = eventually(pushing.status, lambda s: s["connections"] == 0, timeout=WAIT_S)
    assert idle["connections"] == 0

    async def scenario() -> None:
        held = [await connect(pushing.url) for _ in range(4)]
        try:
            # Each connection is counted once the worker has taken it up.
            for socket in held:
                await socket.send(json.dumps({"type": "unsubscribe", "id": "none"}))
                assert json.loads(await socket.recv())["type"] == "error"
            async with connect(pushing.url) as extra:
                with pytest.raises(ConnectionClosed) as closed:
                    await asyncio.wait_for(extra.recv(), WAIT_S)
                assert closed.value.rcvd is not None
                assert closed.value.rcvd.code == TRY_AGAIN_LATER
        finally:
            for socket in held:
                await socket.close()

    asyncio.run(scenario())


def test_an_oversized_request_closes_the_connection(pushing: Pushing) -> None:
    async def scenario() -> None:
        async with connect(pushing.url) as socket:
            await socket.send(json.dumps({"type": "subscribe", "id": "x" * 70_000}))
            with pytest.raises(ConnectionClosed) as closed:
                await asyncio.wait_for(socket.recv(), WAIT_S)
            assert closed.value.rcvd is not None
            assert closed.value.rcvd.code == MESSAGE_TOO_BIG

    asyncio.run(scenario())


def test_a_slow_client_is_dropped_and_the_others_keep_receiving(
    pushing: Pushing,
) -> None:
    """A client that never reads fills its queue and is closed with TOO_SLOW; a
    client reading the same events gets every one of them, once."""
    settings = pushing.settings
    account = f"acc-bulk-{uuid.uuid4().hex[:6]}"
    topic = settings.topics.events("accounts")
    commands = [
        OpenAccount(account_id=account, owner_id="o", currency="USD"),
        # The drop came after about 6,000 in a run on the development machine
        # (the queue and both sockets' buffers full): room for 5 times that.
        *(deposit(account, 1, f"t{n}") for n in range(30_000)),
    ]
    framed = encode_events(
        codec_for(settings),
        topic,
        domain_events(
            accounts, accounts.AGGREGATE_TYPE, commands, start=datetime.now(UTC)
        ),
    )
    producer = Producer(settings.producer_config())
    partition = partition_for(account.encode(), settings.partitions)
    # Each chunk is read by the fast client before the next is produced, so its
    # queue (1,000 here) never holds more than one chunk: it is never dropped.
    chunk = 500

    def produce(records: list[Any]) -> None:
        for record in records:
            producer.produce(
                topic,
                record.value,
                record.key,
                partition=partition,
                headers=record.headers,
            )
        assert producer.flush(30) == 0

    async def scenario() -> tuple[list[dict[str, Any]], list[dict[str, Any]], Any]:
        # max_queue=1: the slow client's library takes one message off the socket
        # and then stops reading it, as a stuck client would.
        async with (
            connect(pushing.url, max_queue=1) as slow,
            connect(pushing.url) as fast,
        ):
            fast_client, slow_client = Client(fast), Client(slow)
            await fast_client.subscribe("f", aggregate_id=account)
            await slow_client.subscribe("s", event_type="MoneyDeposited")
            produced = 0

            async def chunk_received() -> None:
                nonlocal produced
                await asyncio.to_thread(produce, framed[produced : produced + chunk])
                produced += chunk
                await fast_client.until("f", produced)

            while produced < len(framed) and pushing.status()["dropped"] == 0:
                await chunk_received()
            assert pushing.status()["dropped"] == 1
            # The fast client goes on receiving after the drop.
            for _ in range(2):
                await chunk_received()
            got = fast_client.events["f"]
            # The slow client reads at last: what was on its way, then the close.
            with pytest.raises(ConnectionClosed) as closed:
                await slow_client.read_to_close()
            return got, slow_client.events.get("s", []), closed.value

    got, slow_got, closed = asyncio.run(scenario())
    assert versions(got) == list(range(1, len(got) + 1))
    assert len(got) % chunk == 0
    assert closed.rcvd is not None
    assert closed.rcvd.code == TOO_SLOW
    assert closed.rcvd.reason.startswith("too slow")
    # It was dropped before it had everything, and what it had came in order.
    assert 0 < len(slow_got) < len(got) - 1
    assert versions(slow_got) == list(range(2, len(slow_got) + 2))


def test_resume_across_a_worker_restart_is_exactly_once(pushing: Pushing) -> None:
    account, _ = ids()
    settings = pushing.settings

    async def before_restart() -> list[dict[str, Any]]:
        async with pushing.client() as client:
            await client.subscribe("s", aggregate_id=account)
            await pushing.send(*opened(account))
            return await client.until("s", 3)

    first = asyncio.run(before_restart())
    pushing.worker.stop(kill=True)
    # A command sent while the worker is down is decided once it is back.
    with CommandClient(settings) as client:
        waiting = client.submit(deposit(account, 3, "t3"))
        start_serving(pushing.worker, settings)
        assert all(r.accepted for r in client.wait([waiting], timeout=WAIT_S))
    sent(settings, deposit(account, 4, "t4"))

    async def after_restart() -> list[dict[str, Any]]:
        async with pushing.client() as client:
            await client.subscribe("s", first[-1]["resume"], aggregate_id=account)
            await client.until("s", 2)
            await pushing.send(deposit(account, 5, "t5"))
            got = await client.until("s", 3)
            await client.unsubscribe("s")
            return got

    second = asyncio.run(after_restart())
    assert versions(first) == [1, 2, 3]
    assert versions(second) == [4, 5, 6]
    deposited = [e["data"]["amount_minor"] for e in first[1:] + second]
    assert deposited == [1, 2, 3, 4, 5]
