"""A batch's row changes, merged and written set-based, leave the same table as the
same changes applied one at a time, in order (real Postgres)."""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg import sql

from app.adapters.rows import Rows, Table, describe
from app.settings import Settings

CONFLICTS = {
    "batch_t": "a = EXCLUDED.a, b = EXCLUDED.b",
    "one_t": "a = EXCLUDED.a, b = EXCLUDED.b",
}


@pytest.fixture
def conn(session_settings: Settings) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(session_settings.database_url) as conn:
        for name in ("batch_t", "one_t"):
            conn.execute(
                f"CREATE TEMP TABLE {name} (k text, j integer, a bigint NOT NULL"
                " DEFAULT 0, b text NOT NULL DEFAULT '', PRIMARY KEY (k, j))"
            )
        conn.commit()
        yield conn


def _changes(seed: int, count: int) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    rng = random.Random(seed)
    changes = []
    for _ in range(count):
        key = {"k": rng.choice("xyz"), "j": rng.randint(1, 2)}
        kind = rng.choice(["insert", "update", "delete", "add"])
        value = {
            "a": rng.randint(-5, 5),
            "b": rng.choice(["p", "q", "r"]),
            "mode": rng.randrange(8),
        }
        changes.append((kind, key, value))
    return changes


def _apply(
    rows: Rows, table: str, kind: str, key: dict[str, Any], value: dict[str, Any]
) -> None:
    if kind == "insert":
        rows.insert(table, {**key, "a": value["a"], "b": value["b"]})
    elif kind == "update":
        # A set, a delta, or both, on one column or two: every merge rule runs.
        sets = [None, {"b": value["b"]}, {"a": value["a"] * 10}, {"a": 7, "b": "s"}]
        adds = [None, {"a": value["a"]}]
        rows.update(
            table,
            key,
            set=sets[value["mode"] % 4],
            add=None if value["mode"] % 4 > 1 else adds[value["mode"] % 4 or 1],
        )
    elif kind == "delete":
        rows.delete(table, key)
    else:
        rows.add(table, key, a=value["a"])


def _contents(conn: psycopg.Connection[Any], table: str) -> list[tuple[Any, ...]]:
    query = sql.SQL("SELECT k, j, a, b FROM {} ORDER BY k, j")
    return conn.execute(query.format(sql.Identifier(table))).fetchall()


@pytest.mark.parametrize("seed", range(25))
def test_a_batch_leaves_what_one_change_at_a_time_leaves(
    conn: psycopg.Connection[Any], seed: int
) -> None:
    tables = {name: describe(conn, name) for name in ("batch_t", "one_t")}
    changes = _changes(seed, 40)
    with conn.cursor() as cur:
        batch = Rows(tables, CONFLICTS)
        for change in changes:
            _apply(batch, "batch_t", *change)
        batch.write(cur, ["batch_t"])
        for change in changes:
            one = Rows(tables, CONFLICTS)
            _apply(one, "one_t", *change)
            one.write(cur, ["one_t"])
    assert _contents(conn, "one_t"), "the sequence should leave some rows"
    assert _contents(conn, "batch_t") == _contents(conn, "one_t")


def test_statements_get_every_calls_values_as_arrays(
    conn: psycopg.Connection[Any],
) -> None:
    tables = {"batch_t": describe(conn, "batch_t")}
    rows = Rows(tables)
    query = (
        "INSERT INTO batch_t (k, j, a) SELECT k, 1, sum(a) FROM"
        " unnest(%(k)b::text[], %(a)b::bigint[]) AS m(k, a) GROUP BY k"
    )
    for k, a in [("x", 1), ("y", 2), ("x", 3)]:
        rows.statement(query, k=k, a=a)
    with conn.cursor() as cur:
        rows.write(cur, ["batch_t"])
    assert _contents(conn, "batch_t") == [("x", 1, 4, ""), ("y", 1, 2, "")]


def test_describe_reads_types_and_the_primary_key_in_order(
    conn: psycopg.Connection[Any],
) -> None:
    table = describe(conn, "batch_t")
    assert table.key == ("k", "j")
    assert table.types == {"k": "text", "j": "integer", "a": "bigint", "b": "text"}
    with pytest.raises(ValueError, match="no_such_table does not exist"):
        describe(conn, "no_such_table")


def test_a_change_without_its_key_or_to_another_table_is_refused() -> None:
    tables = {"t": Table("t", {"k": "text", "a": "bigint"}, ("k",))}
    rows = Rows(tables)
    with pytest.raises(ValueError, match="needs its key column 'k'"):
        rows.update("t", {"a": 1}, set={"a": 2})
    with pytest.raises(ValueError, match="both sets and adds to a"):
        rows.update("t", {"k": "x"}, set={"a": 2}, add={"a": 1})
    with pytest.raises(ValueError, match="other is not one of the projection's tables"):
        rows.insert("other", {"k": "x"})
