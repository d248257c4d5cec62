"""The read side of the worker: its Postgres projections (in a child process), and
the HTTP query views, status and metrics on the worker's web server."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

import faust
from psycopg_pool import AsyncConnectionPool

from app import params as checked
from app import query
from app.projections import PROJECTIONS
from app.projections.engine import Status
from app.projections.process import ProjectionProcess
from app.settings import Settings

if TYPE_CHECKING:
    from app.history import TP, EventStore, HistoricEvent, Indexed

log = logging.getLogger("streamfold.query")

# Which projection's progress answers a read-your-writes wait, per query area.
AREA_PROJECTION = {"orders": "orders", "accounts": "ledger"}
# The events topic's area of each aggregate type.
AREA_OF_TYPE = {"order": "orders", "account": "accounts"}
# The "area" of the views over the event-log index, which wait for it (see
# ``ReadSide.wait_for_index``).
INDEX = "index"
# How far below a subscription's position the event-log index may stop for good:
# its position is the offset after the last event it applied, so a transaction's
# commit marker (or an aborted transaction's records) after it is never passed.
# Once the index stands still within this many offsets, the rest is read from the
# log (see ``ReadSide.index_below``).
SETTLED_GAP = 64
# The first pause between looks at the index's position; it doubles up to the last.
INDEX_POLL_S = (0.02, 0.5)


class ReadSide:
    """The worker's read side: the Postgres projections (in a process of their own,
    ``ProjectionProcess``) and the query connection pool."""

    def __init__(
        self, settings: Settings, names: tuple[str, ...] | None = None
    ) -> None:
        self.settings = settings
        chosen = names if names is not None else tuple(PROJECTIONS)
        self.projections = ProjectionProcess(
            settings, chosen, processes=settings.projection_processes
        )
        self._pool: AsyncConnectionPool | None = None

    def start(self) -> None:
        self.projections.start()

    def stop(self, timeout: float = 30.0) -> None:
        self.projections.stop(timeout)

    async def pool(self) -> AsyncConnectionPool:
        if self._pool is None:
            pool = AsyncConnectionPool(
                self.settings.query_database_url, min_size=1, max_size=4, open=False
            )
            await pool.open(wait=True, timeout=30)
            self._pool = pool
        return self._pool

    def statuses(self) -> list[Status]:
        return list(self.projections.statuses.values())

    async def wait_for(
        self, area: str, params: Mapping[str, str], projection: str | None = None
    ) -> bool:
        """Read-your-writes: True when the area's projection (or ``projection``,
        which reads the area's events) has passed ``after`` ("partition:offset" of
        the area's events topic, from a command result), False when it timed out
        (stale)."""
        after = checked.position(params, self.settings.partitions)
        if after is None:
            return True
        partition, offset = after
        name = projection or AREA_PROJECTION[area]
        if name not in self.projections.names:
            return False
        topic = self.settings.topics.events(area)
        return await asyncio.to_thread(
            self.projections.wait_for,
            name,
            topic,
            partition,
            offset,
            self.settings.query_wait_s,
        )

    async def wait_for_index(self, kind: str | None, params: Mapping[str, str]) -> bool:
        """Read-your-writes on the event-log index (history and state): as
        ``wait_for``, on the events topic of aggregate type ``kind``, which
        ``after`` needs (a position names a partition of one type's topic)."""
        from app.history import EventLogProjection

        if not params.get("after"):
            return True
        if kind not in AREA_OF_TYPE:
            raise checked.BadParameter(
                "type", "give the aggregate's type (order, account) with after"
            )
        return await self.wait_for(
            AREA_OF_TYPE[kind], params, projection=EventLogProjection.name
        )

    async def index_below(
        self, aggregate_id: str, ends: Mapping[TP, int]
    ) -> Indexed | None:
        """The events of ``aggregate_id`` below ``ends`` (per partition, the next
        offset of a subscription's position) from the event-log index, for the
        WebSocket push to fold the aggregate's view from: waits (as read-your-
        writes does, at most STREAMFOLD_QUERY_WAIT) until the index has passed
        ``ends``, or has stopped within ``SETTLED_GAP`` of them; then gives what
        it holds below both, with, per partition, the offset below which that is
        all (the log holds the rest). None when the index projection does not run
        in this worker or Postgres could not be read: then the log is read."""
        from psycopg import Error

        from app.history import EventLogProjection, indexed_below

        if EventLogProjection.name not in self.projections.names or not ends:
            return None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.query_wait_s
        pause, longest = INDEX_POLL_S
        before: dict[TP, int] | None = None

        def enough(reached: dict[TP, int]) -> bool:
            left = [end - reached.get(tp, 0) for tp, end in ends.items()]
            return (
                max(left) <= 0
                or (reached == before and max(left) <= SETTLED_GAP)
                or loop.time() >= deadline
            )

        try:
            while True:
                async with (await self.pool()).connection() as conn:
                    reached, found = await indexed_below(
                        conn, aggregate_id, ends, enough
                    )
                if found is not None:
                    return found
                before = reached
                await asyncio.sleep(min(pause, max(0.0, deadline - loop.time())))
                pause = min(pause * 2, longest)
        except Error as error:  # a pool timeout too
            log.warning("push: the event-log index could not be read: %s", error)
            return None


def status_document(settings: Settings, read: ReadSide) -> dict[str, Any]:
    return {
        "app_id": settings.app_id,
        "projections": [
            {
                "name": s.projection,
                "applied": s.applied,
                "dead_lettered": s.dead_lettered,
                "lag_events": s.lag_events,
                "lag_seconds": round(s.lag_seconds, 3),
                "rebuilt_at": s.rebuilt_at.isoformat() if s.rebuilt_at else None,
                "error": s.error,
                "positions": [
                    {
                        "topic": t,
                        "partition": p,
                        "next_offset": o,
                        "head": s.heads.get((t, p)),
                    }
                    for (t, p), o in sorted(s.positions.items())
                ],
            }
            for s in read.statuses()
        ],
    }


def metrics_text(read: ReadSide) -> str:
    lines = [
        "# HELP streamfold_projection_lag_events Events between the projection and the head.",
        "# TYPE streamfold_projection_lag_events gauge",
    ]
    for s in read.statuses():
        lines.append(
            f'streamfold_projection_lag_events{{projection="{s.projection}"}} '
            f"{s.lag_events}"
        )
    lines += [
        "# HELP streamfold_projection_lag_seconds Age of the newest applied event while behind.",
        "# TYPE streamfold_projection_lag_seconds gauge",
    ]
    for s in read.statuses():
        lines.append(
            f'streamfold_projection_lag_seconds{{projection="{s.projection}"}} '
            f"{s.lag_seconds:.3f}"
        )
    lines += [
        "# HELP streamfold_projection_events_total Events applied since start.",
        "# TYPE streamfold_projection_events_total counter",
    ]
    for s in read.statuses():
        lines.append(
            f'streamfold_projection_events_total{{projection="{s.projection}"}} '
            f"{s.applied}"
        )
    lines += [
        "# HELP streamfold_projection_dead_letters_total Events sent to the dead-letter topic.",
        "# TYPE streamfold_projection_dead_letters_total counter",
    ]
    for s in read.statuses():
        lines.append(
            f'streamfold_projection_dead_letters_total{{projection="{s.projection}"}} '
            f"{s.dead_lettered}"
        )
    return "\n".join(lines) + "\n"


Query = Callable[[Any, Mapping[str, str], dict[str, str]], Awaitable[dict[str, Any]]]


def _historic(event: HistoricEvent) -> dict[str, Any]:
    return {
        "stream_version": event.stream_version,
        "event_type": event.event_type,
        "schema_version": event.schema_version,
        "occurred_at": event.occurred_at.isoformat(),
        "event_id": event.event_id,
        "correlation_id": event.correlation_id,
        "causation_id": event.causation_id,
        "user_id": event.user_id,
        "data": event.data,
    }


def store_work(
    settings: Settings, work: Callable[[EventStore], dict[str, Any]]
) -> dict[str, Any]:
    """``work`` on the event-log index, on a connection of its own (blocking); an
    unknown aggregate is ``query.NotFound``, an ambiguous id a ``BadParameter``."""
    import psycopg

    from app.history import AmbiguousAggregate, EventStore, UnknownAggregate

    with psycopg.connect(settings.query_database_url) as conn:
        try:
            return work(EventStore(conn))
        except UnknownAggregate as error:
            raise query.NotFound(str(error)) from None
        except AmbiguousAggregate as error:
            raise checked.BadParameter("type", str(error)) from None


def _with_store(
    settings: Settings, work: Callable[[EventStore], dict[str, Any]]
) -> Awaitable[dict[str, Any]]:
    return asyncio.to_thread(store_work, settings, work)


def _kind(params: Mapping[str, str]) -> str | None:
    return checked.choice(params, "type", ("order", "account"))


async def history_view(
    settings: Settings, aggregate_id: str, params: Mapping[str, str]
) -> dict[str, Any]:
    first = checked.integer(params, "from_version", 1, 1, 2**62)
    last = checked.integer(params, "to_version", 2**62, 1, 2**62)
    checked.in_order("from_version", first, "to_version", last)
    kind = _kind(params)

    def work(store: EventStore) -> dict[str, Any]:
        resolved = store.aggregate_type(aggregate_id, kind)
        events = store.read_stream(resolved, aggregate_id, first, last)
        return {
            "aggregate_type": resolved,
            "aggregate_id": aggregate_id,
            "events": [_historic(e) for e in events],
        }

    return await _with_store(settings, work)


async def state_view(
    settings: Settings, aggregate_id: str, params: Mapping[str, str]
) -> dict[str, Any]:
    from app.adapters import mapper

    version = checked.integer(params, "version", 0, 1, 2**62) or None
    at = checked.timestamp(params, "at")
    if version and at:
        raise checked.BadParameter("at", "give either version or at, not both")
    kind = _kind(params)

    def work(store: EventStore) -> dict[str, Any]:
        resolved = store.aggregate_type(aggregate_id, kind)
        state, reached = store.state(resolved, aggregate_id, version=version, at=at)
        return {
            "aggregate_type": resolved,
            "aggregate_id": aggregate_id,
            "version": reached,
            "state": mapper.to_dict(state),
        }

    return await _with_store(settings, work)


async def correlation_view(settings: Settings, correlation_id: str) -> dict[str, Any]:
    def work(store: EventStore) -> dict[str, Any]:
        events = store.read_correlation(correlation_id)
        if not events:
            raise query.NotFound(f"no events with correlation id {correlation_id}")
        return {
            "correlation_id": correlation_id,
            "events": [_historic(e) for e in events],
        }

    return await _with_store(settings, work)


def attach(
    app: faust.App,
    settings: Settings,
    read: ReadSide,
    write: Callable[[], dict[str, Any]] | None = None,
    push: Callable[[], dict[str, Any]] | None = None,
) -> None:
    """Register the query views, /status and /metrics on the worker's web server;
    ``write`` tells the write side's status (the partitions its processes own),
    ``push`` the WebSocket push's (connections, subscriptions, drops)."""

    def view(
        area: str | None, names: tuple[str, ...], run: Query
    ) -> Callable[..., Awaitable[Any]]:
        # The read models' views wait for ?after= on their area's projection;
        # history and state (area INDEX) on the event-log index, the correlation
        # view not at all.
        takes = (*names, "after") if area else names

        async def handler(web: Any, request: Any, **match: str) -> Any:
            try:
                params = checked.accepted(request.query.items(), takes)
                for name, value in match.items():
                    checked.identifier(value, name)
                if area == INDEX:
                    fresh = await read.wait_for_index(_kind(params), params)
                else:
                    fresh = await read.wait_for(area, params) if area else True
                async with (await read.pool()).connection() as conn:
                    body = await run(conn, params, match)
            except checked.BadParameter as error:
                return web.json(
                    {"error": error.message, "field": error.field}, status=400
                )
            except query.NotFound as error:
                return web.json({"error": str(error)}, status=404)
            except Exception:
                reference = str(uuid.uuid4())
                log.exception("query failed (correlation id %s)", reference)
                return web.json(
                    {"error": "internal error", "correlation_id": reference}, status=500
                )
            if area:
                body["stale"] = not fresh
            return web.json(body)

        return handler

    # Each view: its read-your-writes area, the parameters it takes, what it runs.
    routes: dict[str, tuple[str | None, tuple[str, ...], Query]] = {
        "/query/orders/{order_id}": (
            "orders",
            (),
            lambda c, p, m: query.order(c, m["order_id"]),
        ),
        "/query/orders": (
            "orders",
            ("status", "customer_id", "from", "to", "limit"),
            lambda c, p, m: query.search_orders(c, p),
        ),
        "/query/customers/{customer_id}/orders": (
            "orders",
            ("page", "page_size"),
            lambda c, p, m: query.customer_orders(c, m["customer_id"], p),
        ),
        "/query/search": (
            "orders",
            ("q", "type", "page", "page_size", "cursor"),
            lambda c, p, m: query.search(c, p),
        ),
        "/query/accounts/{account_id}": (
            "accounts",
            (),
            lambda c, p, m: query.account(c, m["account_id"]),
        ),
        "/query/accounts/{account_id}/transactions": (
            "accounts",
            ("page", "page_size"),
            lambda c, p, m: query.transactions(c, m["account_id"], p),
        ),
        "/query/reports/daily": (
            "accounts",
            ("from", "to", "currency"),
            lambda c, p, m: query.daily_report(c, p),
        ),
        "/query/history/{aggregate_id}": (
            INDEX,
            ("type", "from_version", "to_version"),
            lambda c, p, m: history_view(settings, m["aggregate_id"], p),
        ),
        "/query/state/{aggregate_id}": (
            INDEX,
            ("type", "version", "at"),
            lambda c, p, m: state_view(settings, m["aggregate_id"], p),
        ),
        "/query/correlation/{correlation_id}": (
            None,
            (),
            lambda c, p, m: correlation_view(settings, m["correlation_id"]),
        ),
    }
    for path, (area, names, run) in routes.items():
        handler = view(area, names, run)
        handler.__name__ = "query_" + path.strip("/").replace("/", "_").replace(
            "{", ""
        ).replace("}", "")
        app.page(path)(handler)

    async def status(web: Any, request: Any) -> Any:
        document = status_document(settings, read)
        if app.consumer is not None:
            # The Faust agents' partitions (the keyed views).
            document["assignment"] = sorted(
                [tp.topic, tp.partition] for tp in app.consumer.assignment()
            )
        if write is not None:
            document["write"] = write()
        if push is not None:
            document["push"] = push()
        return web.json(document)

    async def metrics(web: Any, request: Any) -> Any:
        return web.text(metrics_text(read), content_type="text/plain; version=0.0.4")

    app.page("/status")(status)
    app.page("/metrics")(metrics)
