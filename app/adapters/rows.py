"""What one batch of events does to a projection's tables, written set-based.

Handlers describe row changes (insert, update, delete, add, or a statement over rows);
``Rows`` merges the changes each row gets within the batch and writes them with one
statement per table and kind over arrays (``unnest``), instead of one statement per
event. A row that gets changes which cannot be merged (a delete, then an insert) gets
them in rounds: round N holds every row's N-th change, so no statement touches a row
twice and each row still sees its changes in event order.

Tables are written in the projection's order, then the statements, then the
callbacks. Column types and primary keys come from the Postgres catalog, through the
connection's search path (so a replay's schema is found like the live one).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any

import psycopg
from psycopg import sql

# On conflict, keep the existing row (an insert-if-absent).
KEEP = "NOTHING"


@dataclass(frozen=True, slots=True)
class Table:
    """A table's column types and primary key, from the catalog."""

    name: str
    types: Mapping[str, str]
    key: tuple[str, ...]


@dataclass(slots=True)
class _Change:
    kind: str  # "insert", "update", "delete" or "add"
    values: dict[str, Any]  # insert: the row; update: key + columns set; else: key
    added: dict[str, Any] = field(default_factory=dict)  # update, add: the deltas

    def merge(self, later: _Change) -> bool:
        """Fold ``later`` into this change if one statement can do both."""
        if later.kind == "update" and self.kind in ("insert", "update"):
            if self.kind == "insert" and not set(later.added) <= set(self.values):
                return False  # a delta on a column the insert left to its default
            self.values.update(later.values)
            for column in later.values:
                self.added.pop(column, None)
            for column, delta in later.added.items():
                if column in self.values:
                    self.values[column] += delta
                else:
                    self.added[column] = self.added.get(column, 0) + delta
            return True
        if later.kind == "add" and self.kind == "add":
            for column, delta in later.added.items():
                self.added[column] = self.added.get(column, 0) + delta
            return True
        if later.kind == "delete" and self.kind in ("insert", "update"):
            # Whatever was inserted or set, the delete alone leaves the same table.
            self.kind, self.values, self.added = "delete", later.values, {}
            return True
        # After a delete an update finds no row; a second delete, nothing to delete.
        return self.kind == "delete" and later.kind in ("delete", "update")


class Rows:
    """The row changes of one batch: per table and row, in the order events gave them."""

    def __init__(
        self, tables: Mapping[str, Table], conflicts: Mapping[str, str] | None = None
    ) -> None:
        self._tables = tables
        self._idents = {name: itemgetter(*t.key) for name, t in tables.items()}
        # table -> what an insert does on a key conflict: KEEP, or "col = ..., ..."
        # (an upsert; the existing row is ``t``, the new one EXCLUDED). Default: error.
        self._conflicts = conflicts or {}
        self._changes: dict[str, dict[Any, list[_Change]]] = {}
        self._statements: dict[str, list[dict[str, Any]]] = {}
        self._callbacks: list[Callable[[psycopg.Cursor[Any]], None]] = []

    # -- what handlers call -----------------------------------------------------------

    def insert(self, table: str, row: Mapping[str, Any]) -> None:
        """A new row; on a key conflict as the projection declares (default: error)."""
        self._change(table, _Change("insert", dict(row)))

    def update(
        self,
        table: str,
        key: Mapping[str, Any],
        *,
        set: Mapping[str, Any] | None = None,
        add: Mapping[str, Any] | None = None,
    ) -> None:
        """Set columns and add to columns of an existing row (none: nothing happens)."""
        both = set.keys() & add.keys() if set and add else ()
        if both:
            raise ValueError(f"update both sets and adds to {', '.join(sorted(both))}")
        self._change(table, _Change("update", {**key, **(set or {})}, dict(add or {})))

    def delete(self, table: str, key: Mapping[str, Any]) -> None:
        self._change(table, _Change("delete", dict(key)))

    def add(self, table: str, key: Mapping[str, Any], **deltas: Any) -> None:
        """Add to a row's counters, creating the row (key + deltas) if it is missing."""
        self._change(table, _Change("add", dict(key), deltas))

    def statement(self, query: str, **values: Any) -> None:
        """Run ``query`` once for the batch after the tables are written, with
        ``%(name)b`` bound to the list of every call's ``name`` (cast it to an array
        type and ``unnest`` it)."""
        self._statements.setdefault(query, []).append(values)

    def then(self, callback: Callable[[psycopg.Cursor[Any]], None]) -> None:
        """Call ``callback(cursor)`` last, inside the batch's transaction."""
        self._callbacks.append(callback)

    def _change(self, name: str, change: _Change) -> None:
        if name not in self._tables:
            raise ValueError(f"{name} is not one of the projection's tables")
        try:
            ident = self._idents[name](change.values)
        except KeyError as missing:
            raise ValueError(
                f"a row of {name} needs its key column {missing}"
            ) from None
        pending = self._changes.setdefault(name, {}).setdefault(ident, [])
        if not (pending and pending[-1].merge(change)):
            pending.append(change)

    # -- writing ----------------------------------------------------------------------

    def write(self, cur: psycopg.Cursor[Any], order: Iterable[str]) -> None:
        """Tables in ``order``, then the statements, then the callbacks."""
        for name in order:
            if name in self._changes:
                self._write_table(cur, self._tables[name], self._changes[name])
        for query, calls in self._statements.items():
            cur.execute(
                query,  # the projection's own constant SQL
                {column: [call[column] for call in calls] for column in calls[0]},
            )
        for callback in self._callbacks:
            callback(cur)

    def _write_table(
        self,
        cur: psycopg.Cursor[Any],
        table: Table,
        rows: Mapping[Any, list[_Change]],
    ) -> None:
        conflict = self._conflicts.get(table.name)
        rounds: list[list[_Change]] = []
        # In key order, so writers of shared rows lock them in one order (no deadlock).
        for ident in sorted(rows, key=_sortable):
            for number, change in enumerate(rows[ident]):
                if number == len(rounds):
                    rounds.append([])
                rounds[number].append(change)
        for changes in rounds:
            groups: dict[tuple[Any, ...], list[_Change]] = {}
            for change in changes:
                shape = (change.kind, tuple(change.values), tuple(change.added))
                groups.setdefault(shape, []).append(change)
            for (kind, columns, added), group in groups.items():
                query = _statement(kind, table, columns, added, conflict)
                arrays = [[c.values[col] for c in group] for col in columns]
                arrays += [[c.added[col] for c in group] for col in added]
                cur.execute(query, arrays)


def _sortable(ident: Any) -> Any:
    # A one-column key is the value itself; its type is the column's, one per table.
    return ident if not isinstance(ident, tuple) else tuple(map(str, ident))


def _arrays(table: Table, columns: Iterable[str]) -> sql.Composed:
    return sql.SQL(", ").join(
        sql.SQL("%b::{}[]").format(sql.SQL(_array_type(table, c))) for c in columns
    )


def _array_type(table: Table, column: str) -> str:
    try:
        return table.types[column]
    except KeyError:
        raise ValueError(f"table {table.name} has no column {column!r}") from None


def _names(columns: Iterable[str]) -> sql.Composed:
    return sql.SQL(", ").join(map(sql.Identifier, columns))


def _statement(
    kind: str,
    table: Table,
    columns: tuple[str, ...],
    added: tuple[str, ...],
    conflict: str | None,
) -> sql.Composed:
    """The one statement that writes a group of ``kind`` changes to ``table``: the
    values of ``columns``, the deltas of ``added``; ``conflict`` is the table's
    ``ON CONFLICT`` action for an insert (``KEEP``, or the projection's SQL)."""
    match kind:
        case "insert":
            return _insert(table, columns, conflict)
        case "add":
            return _add(table, columns, added)
        case "update":
            return _update(table, columns, added)
        case "delete":
            return _delete(table, columns)
    raise ValueError(f"unknown change {kind!r}")


def _insert(
    table: Table, columns: tuple[str, ...], conflict: str | None
) -> sql.Composed:
    tail: sql.Composable
    if conflict is None:
        tail = sql.SQL("")
    elif conflict == KEEP:
        tail = sql.SQL(" ON CONFLICT DO NOTHING")
    else:
        tail = sql.SQL(" ON CONFLICT ({}) DO UPDATE SET {}").format(
            _names(table.key),
            sql.SQL(conflict),  # the projection's own SQL
        )
    return sql.SQL("INSERT INTO {} AS t ({}) SELECT * FROM unnest({}){}").format(
        sql.Identifier(table.name), _names(columns), _arrays(table, columns), tail
    )


def _add(
    table: Table, columns: tuple[str, ...], added: tuple[str, ...]
) -> sql.Composed:
    return sql.SQL(
        "INSERT INTO {} AS t ({}) SELECT * FROM unnest({}) "
        "ON CONFLICT ({}) DO UPDATE SET {}"
    ).format(
        sql.Identifier(table.name),
        _names([*columns, *added]),
        _arrays(table, [*columns, *added]),
        _names(table.key),
        sql.SQL(", ").join(
            sql.SQL("{0} = t.{0} + EXCLUDED.{0}").format(sql.Identifier(c))
            for c in added
        ),
    )


def _update(
    table: Table, columns: tuple[str, ...], added: tuple[str, ...]
) -> sql.Composed:
    given = [*columns, *(f"add.{c}" for c in added)]
    assignments = [
        sql.SQL("{0} = u.{0}").format(sql.Identifier(c))
        for c in columns
        if c not in table.key
    ] + [
        sql.SQL("{0} = t.{0} + u.{1}").format(
            sql.Identifier(c), sql.Identifier(f"add.{c}")
        )
        for c in added
    ]
    return sql.SQL("UPDATE {} AS t SET {} FROM unnest({}) AS u({}) WHERE {}").format(
        sql.Identifier(table.name),
        sql.SQL(", ").join(assignments),
        _arrays(table, [*columns, *added]),
        _names(given),
        _matches(table),
    )


def _delete(table: Table, columns: tuple[str, ...]) -> sql.Composed:
    return sql.SQL("DELETE FROM {} AS t USING unnest({}) AS u({}) WHERE {}").format(
        sql.Identifier(table.name),
        _arrays(table, columns),
        _names(columns),
        _matches(table),
    )


def _matches(table: Table) -> sql.Composed:
    return sql.SQL(" AND ").join(
        sql.SQL("t.{0} = u.{0}").format(sql.Identifier(c)) for c in table.key
    )


def describe(conn: psycopg.Connection[Any], name: str) -> Table:
    """The column types and primary key of ``name`` as the search path finds it."""
    rows = conn.execute(
        "SELECT a.attname, format_type(a.atttypid, a.atttypmod),"
        " coalesce(a.attnum = ANY(i.indkey), false),"
        " array_position(i.indkey::int2[], a.attnum)"
        " FROM pg_attribute a LEFT JOIN pg_index i"
        " ON i.indrelid = a.attrelid AND i.indisprimary"
        " WHERE a.attrelid = to_regclass(%s) AND a.attnum > 0 AND NOT a.attisdropped",
        (name,),
    ).fetchall()
    if not rows:
        raise ValueError(f"table {name} does not exist")
    ordered = sorted(rows, key=lambda row: row[3] or 0)
    key = tuple(column for column, _, in_key, _ in ordered if in_key)
    if not key:
        raise ValueError(f"table {name} has no primary key")
    return Table(name, {column: kind for column, kind, _, _ in rows}, key)
