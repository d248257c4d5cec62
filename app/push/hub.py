"""``GET /ws`` on the worker's web server: clients subscribe to an aggregate, a
correlation id or an event type and get each committed event as it arrives.

One ``LiveFeed`` per worker reads the event topics; ``Hub.dispatch`` runs on the
event loop and puts each event a subscription matches in its connection's bounded
queue, which a task of the connection's own writes out. A connection whose queue is
full is closed (``TOO_SLOW``) rather than waited for, so a slow client never slows
the feed or the other clients. A subscription that resumes from a position reads
its backlog with a reader of its own first (see ``app.push.protocol``); one to an
aggregate that starts after the log's start first folds the aggregate's view from
its earlier events, so that every event it is sent carries the view after it: read
from the event-log index in Postgres (``ReadSide.index_below``), or from the log
where the index does not run or lags.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import struct
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import faust
import orjson
from aiohttp import WSMsgType, web

from app.adapters.codec import Codec, DecodeError, RegistryUnavailable
from app.adapters.eventlog import partition_for
from app.adapters.livefeed import LiveFeed, read_backlog
from app.adapters.topics import KafkaRecord, reader, watermarks
from app.domain import accounts, orders
from app.history import IndexSeed
from app.projections import views
from app.push import protocol
from app.push.protocol import TP, BadRequest, Cursor, Filter, Subscribe
from app.settings import AGGREGATES, Settings

log = logging.getLogger("streamfold.push")

# Close codes (RFC 6455 leaves 4000-4999 to applications).
TOO_SLOW = 4008  # the connection's queue was full: it read too slowly
TRY_AGAIN_LATER = 1013  # the worker has its most connections, or no feed yet
# How long a closing connection waits for the client's close frame.
CLOSE_WAIT_S = 10.0
HEARTBEAT_S = 30.0
BACKLOG_READERS = 2
# How a backlog is read (``read_backlog``; tests give another).
Backlog = Callable[
    [Settings, Mapping[TP, tuple[int, int]], Callable[[KafkaRecord], Any]],
    tuple[list[tuple[KafkaRecord, Any]], dict[TP, int]],
]
FOLDS = {"order": views.fold_order, "account": views.fold_account}
EVENT_TYPES = frozenset(cls.__name__ for cls in (*orders.EVENTS, *accounts.EVENTS))


@dataclass(frozen=True, slots=True)
class PushedEvent:
    """An event as a subscription is sent it: its metadata (None if it could not
    be decoded) and the fields of its message."""

    metadata: dict[str, Any] | None
    data: dict[str, Any] | None
    fields: dict[str, Any]


def decode(codec: Codec, record: KafkaRecord) -> PushedEvent:
    try:
        decoded = codec.decode(record.value or b"")
    except (DecodeError, RegistryUnavailable) as error:
        reason = error.reason if isinstance(error, DecodeError) else str(error)
        return PushedEvent(None, None, {"error": f"undecodable: {reason}"})
    data = dict(decoded.data)
    metadata = data.pop("metadata")
    return PushedEvent(
        metadata,
        data,
        {
            "event_type": decoded.short_name,
            "record_name": decoded.record_name,
            "writer_version": decoded.writer_version,
            "metadata": metadata,
            "data": data,
        },
    )


@dataclass(eq=False, slots=True)
class Subscription:
    id: str
    filter: Filter
    cursor: Cursor
    connection: Connection
    # The order or account view after the last event, for a subscription to an
    # aggregate (seeded from its events below the cursor: ``seeds``).
    view: dict[str, Any] | None = None
    catching_up: asyncio.Task[None] | None = None

    def message(self, record: KafkaRecord, found: PushedEvent) -> bytes:
        body: dict[str, Any] = {
            "type": "event",
            "subscription": self.id,
            "position": {
                "topic": record.topic,
                "partition": record.partition,
                "offset": record.offset,
            },
            "resume": self.cursor.as_json(),
            **found.fields,
        }
        if self.filter.field == "aggregate_id":
            body["view"] = self.fold(found)
        return orjson.dumps(body, default=str)

    def fold(self, found: PushedEvent) -> dict[str, Any] | None:
        """The view after ``found``, folded in (None when not known)."""
        meta, data = found.metadata, found.data
        fold = None if meta is None else FOLDS.get(meta["aggregate_type"])
        if fold is None or meta is None or data is None:
            return None
        self.view = fold(self.view, meta, data) or self.view
        # A version missing from the log: the view is not known here.
        return None if self.view is None or self.view.get("gap") else self.view

    def seeds(self, partitions: Mapping[str, int]) -> dict[TP, tuple[int, int]]:
        """For a subscription to an aggregate, the ranges of the log below its
        cursor that hold the aggregate's earlier events (its partition of each
        event topic, from the start): what its view is folded from before the
        first event is sent, from the event-log index where it can be
        (``Hub._seed_from_index``). Empty when the cursor is at the log's start."""
        if self.filter.field != "aggregate_id":
            return {}
        key = self.filter.value.encode()
        ranges = {}
        for topic, count in partitions.items():
            tp = (topic, partition_for(key, count))
            end = self.cursor.next.get(tp, 0)
            if end > 0:
                ranges[tp] = (0, end)
        return ranges


def text_frame(data: bytes) -> bytes:
    """``data`` as one unmasked, final WebSocket text frame (RFC 6455 5.2), as a
    server sends it."""
    size = len(data)
    if size < 126:
        header = struct.pack("!BB", 0x81, size)
    elif size < 65_536:
        header = struct.pack("!BBH", 0x81, 126, size)
    else:
        header = struct.pack("!BBQ", 0x81, 127, size)
    return header + data


@dataclass(eq=False, slots=True)
class Connection:
    hub: Hub
    socket: web.WebSocketResponse
    size: int
    # The socket's transport, written to at once while nothing is queued and it
    # has room; None: every message goes through the queue.
    transport: asyncio.WriteTransport | None = None
    queue: asyncio.Queue[bytes] = field(init=False)
    room: asyncio.Event = field(default_factory=asyncio.Event)
    subscriptions: dict[str, Subscription] = field(default_factory=dict)
    closed: bool = False
    writer: asyncio.Task[None] | None = None

    def __post_init__(self) -> None:
        self.queue = asyncio.Queue(self.size)
        self.room.set()

    def offer(self, data: bytes) -> None:
        """Send ``data`` without waiting: straight to the socket's transport while
        nothing is queued before it and the transport's buffer is below its high
        mark, else through the queue; a full queue drops the connection."""
        if self.closed:
            return
        if self.queue.empty() and self._write_now(data):
            return
        try:
            self.queue.put_nowait(data)
        except asyncio.QueueFull:
            self.hub.drop(self, TOO_SLOW, f"too slow: {self.size} messages queued")
            return
        if self.queue.qsize() * 2 >= self.size:
            self.room.clear()

    async def put(self, data: bytes) -> None:
        """Queue ``data`` once the queue is less than half full (a backlog goes at
        the client's pace and leaves room for live events)."""
        while not self.closed and self.queue.qsize() * 2 >= self.size:
            self.room.clear()
            await self.room.wait()
        self.offer(data)

    def _write_now(self, data: bytes) -> bool:
        # The frame goes to the transport in one write, as aiohttp writes its own
        # (pings, pongs, the close frame), so none is cut into another; the
        # writer task has nothing in hand here (its queue is empty, and it writes
        # what it takes before it awaits anything), so the order holds.
        transport = self.transport
        if (
            transport is None
            or self.socket.closed
            or transport.is_closing()
            or transport.get_write_buffer_size()
            >= transport.get_write_buffer_limits()[1]
        ):
            return False
        transport.write(text_frame(data))
        return True

    async def write_out(self) -> None:
        with contextlib.suppress(ConnectionError, RuntimeError):
            while True:
                data = await self.queue.get()
                if self.queue.qsize() * 2 < self.size:
                    self.room.set()
                await self.socket.send_frame(data, WSMsgType.TEXT)

    def reply(self, message: dict[str, Any]) -> None:
        self.offer(orjson.dumps(message))


class Hub:
    """The worker's push connections, their subscriptions, and the feed."""

    def __init__(
        self,
        settings: Settings,
        codec: Codec,
        read: Backlog = read_backlog,
        index: IndexSeed | None = None,
    ) -> None:
        self.settings = settings
        self.codec = codec
        self.read = read
        self.index = index
        # Views seeded from the index, the events read there, and the offsets of
        # the log read for seeds (where the index does not run or lags).
        self.seeded = {"from_index": 0, "index_events": 0, "log_offsets": 0}
        self.partitions = {
            settings.topics.events(area): settings.partitions for area in AGGREGATES
        }
        # The feed's position: the next offset it hands over, per partition.
        self.live: dict[TP, int] = {}
        self.following: dict[str, dict[str, set[Subscription]]] = {
            name: {} for name in protocol.FILTERS
        }
        self.connections: set[Connection] = set()
        self.dropped = 0
        # CPU seconds the loop has spent handing the feed's batches out (matching,
        # messages, socket writes).
        self.dispatch_cpu_s = 0.0
        self.feed: LiveFeed | None = None
        self._starting: asyncio.Future[None] | None = None
        # Backlogs are read BACKLOG_READERS at a time, in threads of their own:
        # many clients resuming at once (after a restart) wait for each other, not
        # the query views' threads.
        self._backlogs = ThreadPoolExecutor(BACKLOG_READERS, "sf-push-backlog")
        # Closes under way, held so that they are not collected half done.
        self._closing: set[asyncio.Future[None]] = set()

    # -- the feed ----------------------------------------------------------------

    async def ready(self) -> None:
        """Start the feed once, at the first connection."""
        if self._starting is None:
            self._starting = asyncio.ensure_future(self._start())
        try:
            await asyncio.shield(self._starting)
        except Exception:
            self._starting = None  # the next connection tries again
            raise

    async def _start(self) -> None:
        loop = asyncio.get_running_loop()
        feed = LiveFeed(
            self.settings,
            list(self.partitions),
            lambda batch: loop.call_soon_threadsafe(self.dispatch, batch),
        )
        # Set before it starts: a first batch may be dispatched before start()
        # returns here, and must give its slot back to this feed.
        self.feed = feed
        try:
            starts = await asyncio.to_thread(feed.start)
        except BaseException:
            self.feed = None
            raise
        for tp, offset in starts.items():
            self.live.setdefault(tp, offset)

    def dispatch(self, batch: list[KafkaRecord]) -> None:
        """Hand a batch of the feed to the subscriptions it matches (on the loop)."""
        started = time.thread_time()
        try:
            for record in batch:
                try:
                    self._deliver(record)
                except Exception:  # one event's bug must not stop the feed
                    log.exception(
                        "push: could not deliver %s[%d]@%d",
                        record.topic,
                        record.partition,
                        record.offset,
                    )
                tp = (record.topic, record.partition)
                self.live[tp] = max(self.live.get(tp, 0), record.offset + 1)
        finally:
            self.dispatch_cpu_s += time.thread_time() - started
            if self.feed is not None:
                self.feed.taken()

    def _deliver(self, record: KafkaRecord) -> None:
        found = None
        keys = protocol.keys_from_headers(record.headers)
        if keys is None:
            found = decode(self.codec, record)
            if found.metadata is None:
                log.warning(
                    "push: %s[%d]@%d has no routing headers and does not decode",
                    record.topic,
                    record.partition,
                    record.offset,
                )
                return
            keys = protocol.keys_from_metadata(found.metadata)
        matched = [
            subscription
            for name in protocol.FILTERS
            for subscription in self.following[name].get(keys[name], ())
        ]
        if not matched:
            return
        found = found or decode(self.codec, record)
        tp = (record.topic, record.partition)
        for subscription in matched:
            if subscription.cursor.takes(tp, record.offset):
                subscription.connection.offer(subscription.message(record, found))

    # -- connections -------------------------------------------------------------

    def handle(self, connection: Connection, text: str) -> None:
        """One request of a client's: act on it and answer with an ack or an
        error naming what was wrong."""
        try:
            request = protocol.parse(text, self.partitions, EVENT_TYPES)
            if isinstance(request, Subscribe):
                self._subscribe(connection, request)
            else:
                self._unsubscribe(connection, request.id)
                connection.reply(protocol.ack(request, None))
        except BadRequest as problem:
            connection.reply(protocol.error(problem))

    def _subscribe(self, connection: Connection, request: Subscribe) -> None:
        held = connection.subscriptions
        if request.id in held:
            raise BadRequest(
                "id", "this connection has a subscription so named", request.id
            )
        most = self.settings.ws_max_subscriptions
        if len(held) >= most:
            raise BadRequest(
                "id",
                f"this connection has {most} subscriptions, the most it may have "
                "(STREAMFOLD_WS_MAX_SUBSCRIPTIONS)",
                request.id,
            )
        start = self.live if request.start is None else request.start
        subscription = Subscription(
            request.id, request.filter, Cursor(start), connection
        )
        held[request.id] = subscription
        # A position past the feed's: the feed lags, or it is past the log's end.
        ahead = {
            tp: offset
            for tp, offset in subscription.cursor.next.items()
            if offset > self.live.get(tp, 0)
        }
        if ahead:
            subscription.catching_up = asyncio.ensure_future(
                self._ahead(subscription, request, ahead)
            )
            return
        connection.reply(protocol.ack(request, subscription.cursor))
        self._begin(subscription)

    def _begin(self, subscription: Subscription) -> None:
        if subscription.cursor.behind(self.live) or subscription.seeds(self.partitions):
            subscription.catching_up = asyncio.ensure_future(
                self._catch_up(subscription)
            )
        else:
            self._follow(subscription)

    async def _ahead(
        self, subscription: Subscription, request: Subscribe, ahead: Mapping[TP, int]
    ) -> None:
        """Acknowledge and start a subscription from past the feed's position once
        the broker says it is not past the log's end too; refuse it if it is."""
        connection = subscription.connection
        loop = asyncio.get_running_loop()
        try:
            past = await loop.run_in_executor(
                self._backlogs, past_the_end, self.settings, ahead
            )
        except Exception as error:  # noqa: BLE001 - the client is told, the worker goes on
            past = f"could not be checked ({error}); subscribe again"
        if connection.subscriptions.get(subscription.id) is not subscription:
            return  # unsubscribed, or the connection closed, meanwhile
        if past is not None:
            connection.subscriptions.pop(subscription.id, None)
            connection.reply(protocol.error(BadRequest("from", past, subscription.id)))
            return
        connection.reply(protocol.ack(request, subscription.cursor))
        self._begin(subscription)

    def _follow(self, subscription: Subscription) -> None:
        name, value = subscription.filter.field, subscription.filter.value
        self.following[name].setdefault(value, set()).add(subscription)

    def _unsubscribe(self, connection: Connection, subscription_id: str) -> None:
        subscription = connection.subscriptions.pop(subscription_id, None)
        if subscription is None:
            raise BadRequest(
                "id", "no subscription of this connection has this id", subscription_id
            )
        self._forget(subscription)

    def _forget(self, subscription: Subscription) -> None:
        if subscription.catching_up is not None:
            subscription.catching_up.cancel()
        name, value = subscription.filter.field, subscription.filter.value
        followers = self.following[name].get(value)
        if followers is not None:
            followers.discard(subscription)
            if not followers:
                del self.following[name][value]

    async def _catch_up(self, subscription: Subscription) -> None:
        """Fold the view of a subscription to an aggregate from its events below
        the cursor (``Subscription.seeds``); read the log from the cursor to the
        feed's position, and again while the feed moved on meanwhile; then follow
        the feed. The check that nothing is left and joining the feed happen in
        one step on the loop, so no event falls between them. The cursor does not
        move while the view is seeded, so what arrives meanwhile is read after."""
        connection = subscription.connection
        wanted = functools.partial(self._wanted, subscription.filter)
        loop = asyncio.get_running_loop()
        try:
            seeds = subscription.seeds(self.partitions)
            if seeds:
                seeds = await self._seed_from_index(subscription, seeds)
            while seeds and not connection.closed:
                found, reached = await loop.run_in_executor(
                    self._backlogs, self.read, self.settings, seeds, wanted
                )
                for _, event in found:
                    subscription.fold(event)
                self.seeded["log_offsets"] += sum(
                    reached.get(tp, start) - start for tp, (start, _) in seeds.items()
                )
                seeds = {
                    tp: (reached.get(tp, start), end)
                    for tp, (start, end) in seeds.items()
                    if reached.get(tp, start) < end
                }
            while not connection.closed:
                ranges = subscription.cursor.behind(self.live)
                if not ranges:
                    self._follow(subscription)
                    return
                found, reached = await loop.run_in_executor(
                    self._backlogs, self.read, self.settings, ranges, wanted
                )
                for record, event in found:
                    tp = (record.topic, record.partition)
                    if subscription.cursor.takes(tp, record.offset):
                        await connection.put(subscription.message(record, event))
                for tp, offset in reached.items():
                    subscription.cursor.read_to(tp, offset)
        except Exception as error:  # noqa: BLE001 - the client is told, the worker goes on
            log.warning("push: backlog of %s failed: %s", subscription.id, error)
            connection.subscriptions.pop(subscription.id, None)
            connection.reply(
                protocol.error(
                    BadRequest(
                        None,
                        f"could not read the log from this position ({error}); "
                        "the subscription is gone: subscribe again from the last "
                        "'resume' received",
                        subscription.id,
                    )
                )
            )

    async def _seed_from_index(
        self, subscription: Subscription, seeds: dict[TP, tuple[int, int]]
    ) -> dict[TP, tuple[int, int]]:
        """Fold the view from the aggregate's events the event-log index holds in
        ``seeds``; the ranges left to read from the log (all without an index)."""
        if self.index is None:
            return seeds
        ends = {tp: end for tp, (_, end) in seeds.items()}
        found = await self.index(subscription.filter.value, ends)
        if found is None:
            return seeds
        events, below = found
        for n, (metadata, data) in enumerate(events, 1):
            subscription.fold(PushedEvent(metadata, data, {}))
            if n % 1_000 == 0:
                await asyncio.sleep(0)  # a long stream: let the feed in between
        self.seeded["from_index"] += 1
        self.seeded["index_events"] += len(events)
        return {
            tp: (below.get(tp, start), end)
            for tp, (start, end) in seeds.items()
            if below.get(tp, start) < end
        }

    def _wanted(self, chosen: Filter, record: KafkaRecord) -> PushedEvent | None:
        """The event, decoded, if ``chosen`` matches it (in a backlog's thread)."""
        keys = protocol.keys_from_headers(record.headers)
        if keys is not None:
            return decode(self.codec, record) if chosen.matches(keys) else None
        found = decode(self.codec, record)
        if found.metadata is None:
            return None
        return (
            found
            if chosen.matches(protocol.keys_from_metadata(found.metadata))
            else None
        )

    def close(self, connection: Connection) -> None:
        connection.closed = True
        connection.room.set()
        for subscription in connection.subscriptions.values():
            self._forget(subscription)
        connection.subscriptions.clear()
        self.connections.discard(connection)

    def drop(self, connection: Connection, code: int, reason: str) -> None:
        """Close a connection at once from the server's side (its queue is full)."""
        if connection.closed:
            return
        self.close(connection)
        if connection.writer is not None:
            # Nothing more after the close frame; a frame half written to the
            # socket's buffer is not cut (the task waits only between frames).
            connection.writer.cancel()
        self.dropped += 1
        log.warning("push: dropped a connection (%d): %s", code, reason)
        closing = asyncio.ensure_future(_shut(connection.socket, code, reason))
        self._closing.add(closing)
        closing.add_done_callback(self._closing.discard)

    def status(self) -> dict[str, Any]:
        return {
            "connections": len(self.connections),
            "subscriptions": sum(len(c.subscriptions) for c in self.connections),
            "dropped": self.dropped,
            "seeded": dict(self.seeded),
            "feed": Cursor(self.live).as_json() if self.live else None,
            "cpu_s": {
                "feed": round(0.0 if self.feed is None else self.feed.cpu_s(), 6),
                "dispatch": round(self.dispatch_cpu_s, 6),
            },
        }


def past_the_end(settings: Settings, wanted: Mapping[TP, int]) -> str | None:
    """Which offset of ``wanted`` lies past its partition's end, said for a
    client; None when none does."""
    consumer = reader(settings, "push-ends")
    try:
        for (topic, partition), offset in sorted(wanted.items()):
            _, end = watermarks(consumer, topic, partition)
            if offset > end:
                return (
                    f"offset {offset} of {topic}[{partition}] is past its end ({end})"
                )
    finally:
        consumer.close()
    return None


async def _shut(socket: web.WebSocketResponse, code: int, reason: str) -> None:
    # Without waiting for what is queued to drain: the close frame goes out behind
    # it, and a client that never reads is let go after CLOSE_WAIT_S.
    with contextlib.suppress(Exception):
        await asyncio.wait_for(
            socket.close(code=code, message=reason.encode(), drain=False),
            CLOSE_WAIT_S * 2,
        )


def attach(
    app: faust.App, settings: Settings, codec: Codec, index: IndexSeed | None = None
) -> Hub:
    """Serve ``GET /ws`` on the worker's web server; the hub behind it, which seeds
    views from ``index`` where it can."""
    hub = Hub(settings, codec, index=index)

    async def push(view: Any, request: Any) -> Any:
        socket = web.WebSocketResponse(
            heartbeat=HEARTBEAT_S,
            timeout=CLOSE_WAIT_S,
            max_msg_size=protocol.MAX_REQUEST_BYTES,
            # One compressor per client per message is what fan-out cannot afford.
            compress=False,
        )
        await socket.prepare(request)
        if len(hub.connections) >= settings.ws_max_connections:
            await socket.close(
                code=TRY_AGAIN_LATER,
                message=b"this worker has its most connections "
                b"(STREAMFOLD_WS_MAX_CONNECTIONS)",
            )
            return socket
        transport = request.transport
        connection = Connection(
            hub,
            socket,
            settings.ws_queue,
            transport if isinstance(transport, asyncio.WriteTransport) else None,
        )
        hub.connections.add(connection)
        connection.writer = asyncio.ensure_future(connection.write_out())
        try:
            try:
                await hub.ready()
            except Exception as error:  # noqa: BLE001 - told to the client
                log.warning("push: the event feed did not start: %s", error)
                await socket.close(
                    code=TRY_AGAIN_LATER, message=b"the event feed is not available"
                )
                return socket
            async for message in socket:
                if message.type is WSMsgType.TEXT:
                    hub.handle(connection, message.data)
                elif message.type is WSMsgType.BINARY:
                    connection.reply(
                        protocol.error(BadRequest(None, "send requests as text frames"))
                    )
        finally:
            hub.close(connection)
            connection.writer.cancel()
        return socket

    app.page("/ws")(push)
    return hub
