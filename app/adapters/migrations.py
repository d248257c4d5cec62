"""Applies the numbered SQL migrations in ``tables/migrations`` exactly once each."""

from __future__ import annotations

import re
from importlib import resources

import psycopg

_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")
# Any constant works; it only has to be the same for every Streamfold process.
_LOCK = 0x5F0_1D


def available() -> list[tuple[int, str, str]]:
    folder = resources.files("tables") / "migrations"
    found = []
    for entry in folder.iterdir():
        match = _NAME.match(entry.name)
        if match:
            found.append((int(match.group(1)), entry.name, entry.read_text()))
    return sorted(found)


def migrate(database_url: str) -> list[str]:
    """Apply pending migrations in order, one transaction each; return their names.

    An advisory lock makes concurrent start-ups wait for each other instead of racing.
    """
    applied: list[str] = []
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (_LOCK,))
        try:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " version integer PRIMARY KEY, name text NOT NULL,"
                " applied_at timestamptz NOT NULL DEFAULT now())"
            )
            done = {
                row[0] for row in conn.execute("SELECT version FROM schema_migrations")
            }
            for version, name, sql in available():
                if version in done:
                    continue
                with conn.transaction():
                    conn.execute(sql)  # our own migration files
                    conn.execute(
                        "INSERT INTO schema_migrations (version, name) VALUES (%s, %s)",
                        (version, name),
                    )
                applied.append(name)
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (_LOCK,))
    return applied
