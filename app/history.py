"""History and time travel: the Postgres event-log index, per-aggregate reads, states
as of a version or a time (folded through the domain's ``evolve``), and snapshots.

The index is a projection like any other (``event_log``), so it is rebuilt from the
Kafka topics by a replay; Kafka stays the source of truth.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import typing
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, fields, is_dataclass
from datetime import datetime
from types import MappingProxyType, ModuleType
from typing import Any

import orjson
import psycopg
from psycopg import AsyncConnection
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from app.adapters import mapper
from app.adapters.catalog import SchemaCatalog
from app.adapters.rows import KEEP, Rows
from app.domain import accounts, orders

log = logging.getLogger("streamfold.history")

DECIDERS: dict[str, ModuleType] = {"order": orders, "account": accounts}
SNAPSHOT_EVERY = 100


class UnknownAggregate(LookupError):
    pass


class AmbiguousAggregate(LookupError):
    pass


@dataclass(frozen=True, slots=True)
class HistoricEvent:
    stream_version: int
    event_type: str
    record_name: str
    schema_version: int | None
    occurred_at: datetime
    event_id: str
    correlation_id: str
    causation_id: str
    user_id: str | None
    data: dict[str, Any]
    aggregate_type: str = ""
    aggregate_id: str = ""
    # Where the event lies in Kafka.
    topic: str = ""
    partition: int = -1
    offset: int = -1


def state_schema(cls: type) -> str:
    """A fingerprint of a state class's shape: a snapshot taken with another shape is
    not trusted, since mapping it back could silently drop or invent fields."""

    def shape(tp: Any) -> Any:
        if is_dataclass(tp):
            hints = typing.get_type_hints(tp)
            name = getattr(tp, "__name__", repr(tp))
            return [name, [(f.name, shape(hints[f.name])) for f in fields(tp)]]
        args = typing.get_args(tp)
        return (
            [getattr(tp, "__name__", str(tp)), [shape(a) for a in args]]
            if args
            else str(tp)
        )

    return hashlib.sha256(json.dumps(shape(cls)).encode()).hexdigest()[:16]


# Events and states as JSON, with their timestamps as ISO 8601 strings (orjson writes
# a datetime as ``isoformat()`` does). A value JSON has no form for raises TypeError.
_dumps = functools.partial(orjson.dumps, option=orjson.OPT_NON_STR_KEYS)


def _jsonb(value: Any) -> Jsonb:
    return Jsonb(value, dumps=_dumps)


# -- the index projection ------------------------------------------------------------


def index_event(rows: Rows, meta: dict[str, Any], data: dict[str, Any]) -> None:
    source = meta["source"]
    catalog = _catalog()
    metadata = {k: v for k, v in meta.items() if k != "source"}
    rows.insert(
        "event_log",
        {
            "event_id": meta["event_id"],
            "aggregate_type": meta["aggregate_type"],
            "aggregate_id": meta["aggregate_id"],
            "stream_version": meta["stream_version"],
            "event_type": meta["event_type"],
            "record_name": source["record_name"],
            "schema_version": source["writer_version"],
            "data_version": catalog.latest_version(source["record_name"]),
            "data": _jsonb(data),
            "metadata": _jsonb(metadata),
            "topic": source["topic"],
            "partition": source["partition"],
            "offset": source["offset"],
            "occurred_at": meta["timestamp"],
            "correlation_id": meta["correlation_id"],
        },
    )
    if (
        meta["stream_version"] % SNAPSHOT_EVERY == 0
        and meta["aggregate_type"] in DECIDERS
    ):
        # Every N events the state is folded once and kept, so loading stays short.
        # After the batch's rows are written: the fold reads this very event.
        rows.then(
            functools.partial(
                _snapshot,
                meta["aggregate_type"],
                meta["aggregate_id"],
                meta["stream_version"],
            )
        )


def _snapshot(
    aggregate_type: str, aggregate_id: str, version: int, cur: psycopg.Cursor[Any]
) -> None:
    store = EventStore(cur.connection)
    state, folded = store.state(aggregate_type, aggregate_id, version=version)
    store.save_snapshot(aggregate_type, aggregate_id, folded, state, cur=cur)


class EventLogProjection:
    """Indexes every event. Sends nothing outward, so a replay repeats nothing."""

    name = "event_log"
    areas = ("orders", "accounts")
    tables = ("event_log", "snapshots")
    # A re-emitted event (another id, same stream version) keeps the first one.
    conflicts = MappingProxyType({"event_log": KEEP})
    handlers = MappingProxyType({"*": index_event})


def _data(catalog: SchemaCatalog, row: Mapping[str, Any]) -> dict[str, Any]:
    """An indexed event's data, upcast from the version it is stored as."""
    return catalog.upcast(row["record_name"], row["data_version"], row["data"])


@functools.cache
def _catalog() -> SchemaCatalog:
    """One parsed catalog per process."""
    return SchemaCatalog.load()


# -- the event-store API over the index -------------------------------------------------


class EventStore:
    """Reads the indexed log; folds states; keeps snapshots."""

    def __init__(
        self, conn: psycopg.Connection[Any], catalog: SchemaCatalog | None = None
    ) -> None:
        self.conn = conn
        self.catalog = catalog or _catalog()

    def aggregate_type(self, aggregate_id: str, hint: str | None = None) -> str:
        """The type of the aggregate with this id (``hint`` if given); raises
        ``UnknownAggregate`` when it has no events, ``AmbiguousAggregate`` when
        several types use the id and no hint says which."""
        if hint and hint not in DECIDERS:
            raise UnknownAggregate(
                f"unknown aggregate type {hint!r}; known: {', '.join(DECIDERS)}"
            )
        rows = self.conn.execute(
            "SELECT DISTINCT aggregate_type FROM event_log WHERE aggregate_id = %s"
            " AND (%s::text IS NULL OR aggregate_type = %s)",
            (aggregate_id, hint, hint),
        ).fetchall()
        if not rows:
            raise UnknownAggregate(
                f"no events for {hint + ' ' if hint else ''}{aggregate_id!r}"
            )
        if len(rows) > 1:
            raise AmbiguousAggregate(
                f"{aggregate_id!r} names several aggregates ({', '.join(r[0] for r in rows)});"
                " give the type"
            )
        return str(rows[0][0])

    def _events(self, sql: str, params: Iterable[Any]) -> list[HistoricEvent]:
        with self.conn.cursor(row_factory=dict_row) as cur:
            cur.execute(sql, tuple(params))
            rows = cur.fetchall()
        return [self._event(row) for row in rows]

    def _event(self, row: dict[str, Any]) -> HistoricEvent:
        meta = row["metadata"]
        data = _data(self.catalog, row)
        # The other fields are the columns of the same names (see _COLUMNS).
        columns = {f.name: row[f.name] for f in fields(HistoricEvent) if f.name in row}
        return HistoricEvent(
            **{
                **columns,
                "causation_id": meta.get("causation_id", ""),
                "user_id": meta.get("user_id"),
                "data": data,
            }
        )

    _COLUMNS = (
        "SELECT stream_version, event_type, record_name, schema_version, data_version,"
        " data, metadata, occurred_at, event_id, correlation_id, topic, partition,"
        ' "offset", aggregate_type, aggregate_id FROM event_log '
    )

    def read_stream(
        self,
        aggregate_type: str,
        aggregate_id: str,
        first: int = 1,
        last: int | None = None,
    ) -> list[HistoricEvent]:
        """One aggregate's events with versions in [first, last]."""
        return self._events(
            self._COLUMNS + "WHERE aggregate_type = %s AND aggregate_id = %s"
            " AND stream_version >= %s AND (%s::bigint IS NULL OR stream_version <= %s)"
            " ORDER BY stream_version",
            (aggregate_type, aggregate_id, first, last, last),
        )

    def read_time_range(
        self, since: datetime, until: datetime, limit: int = 1000
    ) -> list[HistoricEvent]:
        return self._events(
            self._COLUMNS + "WHERE occurred_at >= %s AND occurred_at < %s"
            " ORDER BY occurred_at, aggregate_id, stream_version LIMIT %s",
            (since, until, limit),
        )

    def read_correlation(self, correlation_id: str) -> list[HistoricEvent]:
        """Every event of one business flow, across aggregates, in time order."""
        return self._events(
            self._COLUMNS
            + "WHERE correlation_id = %s ORDER BY occurred_at, stream_version",
            (correlation_id,),
        )

    def state(
        self,
        aggregate_type: str,
        aggregate_id: str,
        *,
        version: int | None = None,
        at: datetime | None = None,
        use_snapshots: bool = True,
    ) -> tuple[Any, int]:
        """The aggregate's state as of ``version`` or time ``at`` (default: now)."""
        decider = DECIDERS[aggregate_type]
        state = decider.initial_state()
        cls = type(state)
        start = 1
        if use_snapshots and at is None:
            snapshot = self.latest_snapshot(aggregate_type, aggregate_id, version, cls)
            if snapshot is not None:
                state, start = snapshot[0], snapshot[1] + 1
        if at is not None:
            events = self._events(
                self._COLUMNS + "WHERE aggregate_type = %s AND aggregate_id = %s"
                " AND occurred_at <= %s ORDER BY stream_version",
                (aggregate_type, aggregate_id, at),
            )
        else:
            events = self.read_stream(aggregate_type, aggregate_id, start, version)
        for event in events:
            domain_event: Any = mapper.from_dict(
                self.catalog.class_for(event.record_name), event.data
            )
            state = decider.evolve(state, domain_event)
        return state, state.version

    def latest_snapshot(
        self, aggregate_type: str, aggregate_id: str, version: int | None, cls: type
    ) -> tuple[Any, int] | None:
        row = self.conn.execute(
            "SELECT version, state FROM snapshots WHERE aggregate_type = %s"
            " AND aggregate_id = %s AND state_schema = %s"
            " AND (%s::bigint IS NULL OR version <= %s) ORDER BY version DESC LIMIT 1",
            (aggregate_type, aggregate_id, state_schema(cls), version, version),
        ).fetchone()
        if row is None:
            return None
        try:
            return mapper.from_dict(cls, row[1]), int(row[0])
        except (mapper.MappingError, KeyError, TypeError, ValueError) as error:
            # A snapshot that cannot be read is only a lost shortcut: fold from the start.
            log.warning(
                "ignoring unreadable snapshot of %s %s at v%s: %s",
                aggregate_type,
                aggregate_id,
                row[0],
                error,
            )
            return None

    def save_snapshot(
        self,
        aggregate_type: str,
        aggregate_id: str,
        version: int,
        state: Any,
        *,
        cur: psycopg.Cursor[Any] | None = None,
    ) -> None:
        (cur or self.conn).execute(
            "INSERT INTO snapshots (aggregate_type, aggregate_id, version, state_schema,"
            " state) VALUES (%s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
            (
                aggregate_type,
                aggregate_id,
                version,
                state_schema(type(state)),
                _jsonb(mapper.to_dict(state)),
            ),
        )


# -- an aggregate's events below a position of the log (the WebSocket push) -----------

TP = tuple[str, int]
Indexed = tuple[list[tuple[dict[str, Any], dict[str, Any]]], dict[TP, int]]
# An aggregate's events below a position, from the index (``ReadSide.index_below``,
# which the WebSocket push seeds views with); None when there is none to read.
IndexSeed = Callable[[str, Mapping[TP, int]], Awaitable[Indexed | None]]
SEED_PAGE = 1_000


async def indexed_below(
    conn: AsyncConnection[Any],
    aggregate_id: str,
    ends: Mapping[TP, int],
    enough: Callable[[dict[TP, int]], bool],
) -> tuple[dict[TP, int], Indexed | None]:
    """How far the index has got on each partition of ``ends`` (its projection's
    positions, committed with its rows) and, when that is ``enough``, from the same
    snapshot: the events of ``aggregate_id`` below both that and ``ends`` there, as
    (metadata, data) as the codec gives them (data upcast, the timestamp a
    datetime), in offset order per partition, with the offset below which they
    are all, per partition. Reads only the aggregate's own rows."""
    async with conn.transaction():
        # One snapshot: a replay's switch between the two reads would pair the
        # positions of one index with the rows of another.
        await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        cur = await conn.execute(
            "SELECT topic, partition, next_offset FROM projection_positions"
            " WHERE projection = %s AND topic = ANY(%s)",
            (EventLogProjection.name, sorted({topic for topic, _ in ends})),
        )
        reached = {
            (str(t), int(p)): int(o)
            for t, p, o in await cur.fetchall()
            if (t, p) in ends
        }
        if not enough(reached):
            return reached, None
        below = {tp: min(end, reached.get(tp, 0)) for tp, end in ends.items()}
        events = []
        # Page by page (a long stream's rows are parsed and upcast between waits
        # for the next page, not all in one step of the caller's event loop).
        async with conn.cursor("push_seed", row_factory=dict_row) as rows:
            await rows.execute(
                "SELECT e.record_name, e.data_version, e.data, e.metadata"
                " FROM event_log e JOIN unnest(%s::text[], %s::int[], %s::bigint[])"
                " AS b(topic, part, below) ON e.topic = b.topic AND e.partition = b.part"
                ' WHERE e.aggregate_id = %s AND e."offset" < b.below'
                ' ORDER BY e.topic, e.partition, e."offset"',
                (
                    [t for t, _ in below],
                    [p for _, p in below],
                    list(below.values()),
                    aggregate_id,
                ),
            )
            while page := await rows.fetchmany(SEED_PAGE):
                events += [_as_decoded(row) for row in page]
    return reached, (events, below)


def _as_decoded(row: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """An indexed event's (metadata, data) as the codec gives them."""
    meta = dict(row["metadata"])
    # Stored as JSON: the ISO 8601 text of the datetime the codec gave.
    meta["timestamp"] = datetime.fromisoformat(meta["timestamp"])
    return meta, _data(_catalog(), row)
