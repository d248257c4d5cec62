"""The /ws push without services: parsing requests, matching, the cursor, and the
hub's hand-over from a backlog to the live feed and its drop of a full queue."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

import pytest

from app.adapters.catalog import SchemaCatalog
from app.adapters.codec import Codec, InMemoryRegistry
from app.adapters.topics import KafkaRecord
from app.domain import accounts
from app.domain.accounts import OpenAccount
from app.push import protocol
from app.push.hub import EVENT_TYPES, TOO_SLOW, Connection, Hub, decode
from app.push.protocol import BadRequest, Cursor, Filter, Subscribe, Unsubscribe
from app.settings import Settings
from app.workload import deposit
from bench.harness import domain_events, encode_events

EVENTS = "accounts.events"
PARTITIONS = {"orders.events": 2, EVENTS: 2}


def full(offset: int = 0) -> dict[str, dict[str, int]]:
    return {t: {str(p): offset for p in range(n)} for t, n in PARTITIONS.items()}


def parse(request: Any) -> protocol.Request:
    text = request if isinstance(request, str) else json.dumps(request)
    return protocol.parse(text, PARTITIONS, EVENT_TYPES)


@pytest.mark.parametrize("field", protocol.FILTERS)
def test_a_subscription_follows_one_field(field: str) -> None:
    value = "MoneyDeposited" if field == "event_type" else "x-1"
    request = parse({"type": "subscribe", "id": "s", field: value})
    assert request == Subscribe("s", Filter(field, value), None)


def test_a_subscription_may_resume_from_a_position() -> None:
    start = full(3)
    start[EVENTS]["1"] = 9
    request = parse(
        {"type": "subscribe", "id": "s", "aggregate_id": "a", "from": start}
    )
    assert isinstance(request, Subscribe)
    assert request.start == {
        ("orders.events", 0): 3,
        ("orders.events", 1): 3,
        (EVENTS, 0): 3,
        (EVENTS, 1): 9,
    }
    # The position the server sends back reads as the one it was made from.
    assert Cursor(request.start).as_json() == start


def test_unsubscribe() -> None:
    assert parse({"type": "unsubscribe", "id": "s"}) == Unsubscribe("s")


def _without(position: dict[str, dict[str, int]], partition: str) -> Any:
    cut = {t: dict(p) for t, p in position.items()}
    del cut[EVENTS][partition]
    return cut


def _with(offset: Any) -> Any:
    position: dict[str, Any] = full()
    position[EVENTS]["0"] = offset
    return position


SUB = {"type": "subscribe", "id": "s", "aggregate_id": "a"}


@pytest.mark.parametrize(
    ("request_", "field", "request_id"),
    [
        ("{", None, None),
        ("null", None, None),
        ('["subscribe"]', None, None),
        ("x" * 70_000, None, None),
        ({"type": "subscribed", "id": "s"}, "type", "s"),
        ({"id": "s"}, "type", "s"),
        ({"type": "subscribe", "aggregate_id": "a"}, "id", None),
        ({**SUB, "id": 3}, "id", None),
        ({**SUB, "id": " s"}, "id", " s"),
        ({**SUB, "id": "x" * 201}, "id", "x" * 201),
        ({**SUB, "aggregate_id": ""}, "aggregate_id", "s"),
        ({**SUB, "aggregate_id": None}, "aggregate_id", "s"),
        ({**SUB, "aggregate_id": "a\nb"}, "aggregate_id", "s"),
        ({"type": "subscribe", "id": "s"}, "aggregate_id", "s"),
        ({**SUB, "correlation_id": "c"}, "correlation_id", "s"),
        ({**SUB, "colour": "red"}, "colour", "s"),
        ({"type": "unsubscribe", "id": "s", "aggregate_id": "a"}, "aggregate_id", "s"),
        ({"type": "subscribe", "id": "s", "event_type": "Nope"}, "event_type", "s"),
        ({**SUB, "from": [1, 2]}, "from", "s"),
        ({**SUB, "from": {**full(), "x.events": {}}}, "from.x.events", "s"),
        ({**SUB, "from": {EVENTS: full()[EVENTS]}}, "from.orders.events", "s"),
        ({**SUB, "from": _without(full(), "1")}, f"from.{EVENTS}", "s"),
        (
            {**SUB, "from": {**full(), EVENTS: {"0": 1, "1": 1, "2": 1}}},
            f"from.{EVENTS}",
            "s",
        ),
        ({**SUB, "from": _with(-1)}, f"from.{EVENTS}.0", "s"),
        ({**SUB, "from": _with(True)}, f"from.{EVENTS}.0", "s"),
        ({**SUB, "from": _with(1.5)}, f"from.{EVENTS}.0", "s"),
        ({**SUB, "from": _with("7")}, f"from.{EVENTS}.0", "s"),
    ],
)
def test_a_bad_request_names_its_field(
    request_: Any, field: str | None, request_id: str | None
) -> None:
    with pytest.raises(BadRequest) as refused:
        parse(request_)
    assert (refused.value.field, refused.value.request_id) == (field, request_id)
    answer = protocol.error(refused.value)
    assert answer["type"] == "error" and answer["field"] == field and answer["error"]


def test_keys_come_from_the_routing_headers() -> None:
    headers: dict[str, bytes | None] = {
        "aggregate-id": b"a-1",
        "correlation-id": b"c-1",
        "event-type": b"MoneyDeposited",
        "event-id": b"e",
    }
    keys = protocol.keys_from_headers(headers)
    assert keys == {
        "aggregate_id": "a-1",
        "correlation_id": "c-1",
        "event_type": "MoneyDeposited",
    }
    assert Filter("correlation_id", "c-1").matches(keys)
    assert not Filter("aggregate_id", "a-2").matches(keys)
    assert protocol.keys_from_headers({"aggregate-id": b"a-1"}) is None


def test_the_cursor_hands_over_without_gap_or_repeat() -> None:
    """Backlog [cursor, live) from the log, then the live feed from ``live``:
    what both hand over is taken once, in order."""
    tp = (EVENTS, 0)
    cursor = Cursor({tp: 5, (EVENTS, 1): 2})
    live = {tp: 9, (EVENTS, 1): 2}
    assert cursor.behind(live) == {tp: (5, 9)}
    taken = [o for o in (5, 6, 8) if cursor.takes(tp, o)]  # 7 did not match
    cursor.read_to(tp, 9)
    assert cursor.behind(live) == {}
    # The feed hands over from where it was when the backlog's range was taken;
    # an overlap (a record the backlog had) is dropped.
    taken += [o for o in (8, 9, 11, 11, 10) if cursor.takes(tp, o)]
    assert taken == [5, 6, 8, 9, 11]
    assert cursor.as_json()[EVENTS] == {"0": 12, "1": 2}
    # A cursor ahead of the feed (the client came from a worker further on) drops
    # what the feed has yet to pass.
    ahead = Cursor({tp: 20})
    assert ahead.behind({tp: 9}) == {}
    assert not ahead.takes(tp, 15)
    assert ahead.takes(tp, 20)


# -- the hub ---------------------------------------------------------------------


class Socket:
    """What the hub writes to, recorded."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []
        self.closed: tuple[int, bytes] | None = None
        self.changed = asyncio.Event()

    async def send_frame(self, data: bytes, opcode: Any) -> None:
        self.sent.append(json.loads(data))
        self.changed.set()

    async def close(self, *, code: int, message: bytes, drain: bool) -> bool:
        self.closed = (code, message)
        self.changed.set()
        return True

    async def until(self, done: Callable[[], bool]) -> None:
        while not done():
            self.changed.clear()
            await self.changed.wait()


def account_records(
    account: str, deposits: int, *, first_offset: int = 0, step: int = 1
) -> tuple[list[KafkaRecord], Codec]:
    """An account's events as the feed reads them from partition 0, at offsets
    ``first_offset``, ``+step``, ... (a step above 1: markers or others' records
    between them)."""
    codec = Codec(InMemoryRegistry(), SchemaCatalog.load())
    commands = [
        OpenAccount(account_id=account, owner_id="o", currency="USD"),
        *(deposit(account, n + 1, f"t{n}") for n in range(deposits)),
    ]
    framed = encode_events(
        codec,
        EVENTS,
        domain_events(
            accounts, accounts.AGGREGATE_TYPE, commands, start=datetime.now(UTC)
        ),
    )
    return [
        KafkaRecord(
            EVENTS,
            0,
            first_offset + n * step,
            f.key,
            f.value,
            {
                name: value if not isinstance(value, str) else value.encode()
                for name, value in f.headers
            },
        )
        for n, f in enumerate(framed)
    ], codec


def hub_with(
    codec: Codec, live: Mapping[tuple[str, int], int], read: Callable[..., Any]
) -> Hub:
    settings = Settings(partitions=2)
    hub = Hub(settings, codec, read)
    hub.live = dict(live)
    return hub


def position_of(offset: int) -> dict[str, dict[str, int]]:
    start = full()
    start[EVENTS]["0"] = offset
    return start


async def resumed(hub: Hub, socket: Socket, offset: int) -> asyncio.Task[None]:
    """A connection's subscription "s" to "a-1" from ``offset`` of the account's
    partition, once it has caught up; the connection's writer."""
    connection = Connection(hub, socket, 1_000)  # type: ignore[arg-type]
    hub.connections.add(connection)
    writer = asyncio.ensure_future(connection.write_out())
    hub.handle(
        connection,
        json.dumps(
            {
                "type": "subscribe",
                "id": "s",
                "aggregate_id": "a-1",
                "from": position_of(offset),
            }
        ),
    )
    joining = connection.subscriptions["s"].catching_up
    assert joining is not None
    await joining
    return writer


def test_a_resumed_subscription_joins_the_moving_feed_exactly_once() -> None:
    """The feed moves on while the backlog is read: the hub reads again up to
    where the feed got to, then joins it; every event arrives once, in order."""
    records, codec = account_records("a-1", 9, step=2)
    by_offset = {r.offset: r for r in records}
    ranges_read: list[dict[tuple[str, int], tuple[int, int]]] = []

    async def scenario() -> Socket:
        loop = asyncio.get_running_loop()
        live = {(t, p): 0 for t, n in PARTITIONS.items() for p in range(n)}
        live[(EVENTS, 0)] = 8  # the feed has passed offsets 0..6

        def read(settings: Any, ranges: Any, wanted: Any) -> Any:
            ranges_read.append(dict(ranges))
            [(tp, (start, end))] = ranges.items()
            found = [(r, wanted(r)) for o, r in by_offset.items() if start <= o < end]
            if start == 2:
                # Meanwhile the feed hands over offsets 8..12 (one already read
                # again below: 6 repeats at the join).
                later = [by_offset[o] for o in (6, 8, 10, 12)]
                asyncio.run_coroutine_threadsafe(_dispatch(hub, later), loop).result()
            return [(r, f) for r, f in sorted(found, key=lambda x: x[0].offset) if f], {
                tp: end
            }

        hub = hub_with(codec, live, read)
        socket = Socket()
        writer = await resumed(hub, socket, 2)  # read the backlog, joined the feed
        # Live from here on: 12 again (a repeat), then 14..18.
        await _dispatch(hub, [by_offset[o] for o in (12, 14, 16, 18)])
        await socket.until(lambda: len(socket.sent) >= 1 + 9)
        writer.cancel()
        return socket

    socket = asyncio.run(scenario())
    [ack, *events] = socket.sent
    assert ack == {
        "type": "ack",
        "request": "subscribe",
        "id": "s",
        "position": position_of(2),
    }
    assert [e["position"]["offset"] for e in events] == [2, 4, 6, 8, 10, 12, 14, 16, 18]
    assert [e["metadata"]["stream_version"] for e in events] == list(range(2, 11))
    # First the account's events below the cursor (for its view), then the
    # backlog, twice (the feed moved on).
    assert ranges_read == [
        {(EVENTS, 0): (0, 2)},
        {(EVENTS, 0): (2, 8)},
        {(EVENTS, 0): (8, 13)},
    ]
    assert events[-1]["resume"][EVENTS]["0"] == 19
    # Joined after the account's first event: the view after each event all the
    # same, folded from the one below the cursor (AccountOpened) on.
    assert [(e["view"]["version"], e["view"]["balance_minor"]) for e in events] == [
        (v, sum(range(1, v))) for v in range(2, 11)
    ]


@pytest.mark.parametrize("indexed_to", [8, 4])
def test_a_view_is_seeded_from_the_index_and_the_log_only_past_it(
    indexed_to: int,
) -> None:
    """Resumed after four of the account's events: the index gives those below
    where it has got to, and only the rest below the cursor is read from the log
    (nothing when the index has passed the cursor), not the partition."""
    records, codec = account_records("a-1", 9, step=2)
    by_offset = {r.offset: r for r in records}
    asked: list[tuple[str, dict[tuple[str, int], int]]] = []
    ranges_read: list[dict[tuple[str, int], tuple[int, int]]] = []

    async def index(aggregate_id: str, ends: Any) -> Any:
        asked.append((aggregate_id, dict(ends)))
        below = {tp: min(end, indexed_to) for tp, end in ends.items()}
        events = [decode(codec, by_offset[o]) for o in range(0, indexed_to, 2)]
        return [(e.metadata, e.data) for e in events], below

    def read(settings: Any, ranges: Any, wanted: Any) -> Any:
        ranges_read.append(dict(ranges))
        [(tp, (start, end))] = ranges.items()
        found = [(r, wanted(r)) for o, r in by_offset.items() if start <= o < end]
        return [(r, f) for r, f in found if f], {tp: end}

    async def scenario() -> tuple[Hub, Socket]:
        live = {(t, p): 0 for t, n in PARTITIONS.items() for p in range(n)}
        live[(EVENTS, 0)] = 8
        hub = hub_with(codec, live, read)
        hub.index = index
        socket = Socket()
        writer = await resumed(hub, socket, 8)
        await _dispatch(hub, [by_offset[o] for o in range(8, 20, 2)])
        await socket.until(lambda: len(socket.sent) >= 1 + 6)
        writer.cancel()
        return hub, socket

    hub, socket = asyncio.run(scenario())
    [_, *events] = socket.sent
    # Asked for the account's events below the cursor on its partition only.
    assert asked == [("a-1", {(EVENTS, 0): 8})]
    assert ranges_read == ([] if indexed_to == 8 else [{(EVENTS, 0): (4, 8)}])
    assert [(e["view"]["version"], e["view"]["balance_minor"]) for e in events] == [
        (v, sum(range(1, v))) for v in range(5, 11)
    ]
    assert hub.seeded == {
        "from_index": 1,
        "index_events": indexed_to // 2,
        "log_offsets": 8 - indexed_to,
    }


def test_without_an_index_the_seed_reads_the_log() -> None:
    """The index does not run here (None): the partition is read below the
    cursor, as the fallback."""
    records, codec = account_records("a-1", 3)
    ranges_read: list[dict[tuple[str, int], tuple[int, int]]] = []

    async def no_index(aggregate_id: str, ends: Any) -> Any:
        return None

    def read(settings: Any, ranges: Any, wanted: Any) -> Any:
        ranges_read.append(dict(ranges))
        [(tp, (start, end))] = ranges.items()
        return [(r, wanted(r)) for r in records if start <= r.offset < end], {tp: end}

    async def scenario() -> Hub:
        hub = hub_with(codec, {(EVENTS, 0): 3, (EVENTS, 1): 0}, read)
        hub.index = no_index
        connection = Connection(hub, Socket(), 10)  # type: ignore[arg-type]
        hub.handle(
            connection,
            json.dumps({"type": "subscribe", "id": "s", "aggregate_id": "a-1"}),
        )
        joining = connection.subscriptions["s"].catching_up
        assert joining is not None
        await joining
        assert connection.subscriptions["s"].view is not None
        assert connection.subscriptions["s"].view["balance_minor"] == 3
        return hub

    hub = asyncio.run(scenario())
    assert ranges_read == [{(EVENTS, 0): (0, 3)}]
    assert hub.seeded == {"from_index": 0, "index_events": 0, "log_offsets": 3}


async def _dispatch(hub: Hub, records: list[KafkaRecord]) -> None:
    """What the feed does with a batch, on the loop."""
    hub.dispatch(records)


def test_a_full_queue_drops_its_connection_and_no_other() -> None:
    records, codec = account_records("a-1", 5)

    async def scenario() -> tuple[Hub, Socket, Socket, Connection]:
        hub = hub_with(codec, {(EVENTS, 0): 0, (EVENTS, 1): 0}, _no_backlog)
        slow, fast = Socket(), Socket()
        stuck = Connection(hub, slow, 4)  # type: ignore[arg-type]
        reading = Connection(hub, fast, 200)  # type: ignore[arg-type]
        for connection in (stuck, reading):
            hub.connections.add(connection)
            hub.handle(
                connection,
                json.dumps({"type": "subscribe", "id": "s", "aggregate_id": "a-1"}),
            )
        reading.writer = asyncio.ensure_future(reading.write_out())
        # The stuck one's writer never runs: its queue holds the ack and 3 events.
        await _dispatch(hub, records)
        await fast.until(lambda: len(fast.sent) >= 7)
        await slow.until(lambda: slow.closed is not None)
        reading.writer.cancel()
        return hub, slow, fast, stuck

    hub, slow, fast, stuck = asyncio.run(scenario())
    assert slow.closed == (TOO_SLOW, b"too slow: 4 messages queued")
    assert hub.dropped == 1 and stuck.closed and stuck not in hub.connections
    assert [e["metadata"]["stream_version"] for e in fast.sent[1:]] == [
        1,
        2,
        3,
        4,
        5,
        6,
    ]
    # Subscribed from the account's first event: its view after each.
    assert [e["view"]["balance_minor"] for e in fast.sent[1:]] == [0, 1, 3, 6, 10, 15]


class Transport:
    """A socket's transport with ``buffered`` bytes not yet sent, recorded."""

    def __init__(self) -> None:
        self.written = b""
        self.buffered = 0

    def is_closing(self) -> bool:
        return False

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return (16_384, 65_536)

    def write(self, data: bytes) -> None:
        self.written += data

    def frames(self) -> list[dict[str, Any]]:
        """The text frames written, each read back from its header's length (7
        bits, or 126 and 16 bits: these messages are below 64 KiB)."""
        found, data = [], self.written
        while data:
            assert data[0] == 0x81, "a final text frame, unmasked"
            size, start = data[1], 2
            if size == 126:
                size, start = int.from_bytes(data[2:4], "big"), 4
            found.append(json.loads(data[start : start + size]))
            data = data[start + size :]
        return found


def test_a_message_goes_straight_to_a_transport_with_room_else_queues_in_order() -> (
    None
):
    """Nothing queued and room in the transport: the frame is written at once,
    without the writer task. A full transport: messages queue, and the ones after
    them queue too even once it has room, so none overtakes another."""
    records, codec = account_records("a-1", 7)

    async def scenario() -> tuple[Transport, Socket, int]:
        hub = hub_with(codec, {(EVENTS, 0): 0, (EVENTS, 1): 0}, _no_backlog)
        socket, transport = Socket(), Transport()
        connection = Connection(hub, socket, 200, transport)  # type: ignore[arg-type]
        hub.connections.add(connection)
        hub.handle(
            connection,
            json.dumps({"type": "subscribe", "id": "s", "aggregate_id": "a-1"}),
        )
        await _dispatch(hub, records[:2])
        transport.buffered = 65_536  # at its high mark
        await _dispatch(hub, records[2:4])
        transport.buffered = 0
        await _dispatch(hub, records[4:6])
        queued = connection.queue.qsize()
        connection.writer = asyncio.ensure_future(connection.write_out())
        await socket.until(lambda: len(socket.sent) >= 4)
        await _dispatch(hub, records[6:])
        connection.writer.cancel()
        return transport, socket, queued

    transport, socket, queued = asyncio.run(scenario())
    assert queued == 4
    [ack, *direct] = transport.frames()
    assert ack["type"] == "ack"
    versions = [e["metadata"]["stream_version"] for e in direct]
    assert versions == [1, 2, 7, 8]
    assert [e["metadata"]["stream_version"] for e in socket.sent] == [3, 4, 5, 6]


def _no_backlog(*args: Any) -> Any:
    raise AssertionError("nothing is behind the feed here")


def test_requests_a_connection_cannot_make() -> None:
    _, codec = account_records("a-1", 0)

    async def scenario() -> list[dict[str, Any]]:
        hub = hub_with(codec, {(EVENTS, 0): 0}, _no_backlog)
        hub.settings = Settings(partitions=2, ws_max_subscriptions=2)
        socket = Socket()
        connection = Connection(hub, socket, 200)  # type: ignore[arg-type]
        writer = asyncio.ensure_future(connection.write_out())
        for request in (
            {"type": "subscribe", "id": "a", "aggregate_id": "x"},
            {"type": "subscribe", "id": "a", "aggregate_id": "y"},
            {"type": "subscribe", "id": "b", "aggregate_id": "y"},
            {"type": "subscribe", "id": "c", "aggregate_id": "z"},
            {"type": "unsubscribe", "id": "z"},
            {"type": "unsubscribe", "id": "a"},
        ):
            hub.handle(connection, json.dumps(request))
        await socket.until(lambda: len(socket.sent) >= 6)
        writer.cancel()
        assert set(hub.following["aggregate_id"]) == {"y"}
        return socket.sent

    sent = asyncio.run(scenario())
    assert [(m["type"], m["id"], m.get("field")) for m in sent] == [
        ("ack", "a", None),
        ("error", "a", "id"),
        ("ack", "b", None),
        ("error", "c", "id"),
        ("error", "z", "id"),
        ("ack", "a", None),
    ]
