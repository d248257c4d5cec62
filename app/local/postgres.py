"""A real PostgreSQL server on this machine, from Debian's packages.

Installs the server when absent (as root), starts the default cluster, and creates the
database with its two roles: a writer for migrations and sinks, a read-only role for
queries. Every step checks first, so a second run changes nothing.
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from app.local.process import ServiceError, apt_install, wait_for

WRITER_ROLE = "streamfold_writer"
READER_ROLE = "streamfold_reader"


@dataclass(frozen=True, slots=True)
class Conninfo:
    user: str
    password: str
    host: str
    port: int
    database: str

    @classmethod
    def parse(cls, url: str) -> Conninfo:
        parts = urlsplit(url)
        return cls(
            user=unquote(parts.username or ""),
            password=unquote(parts.password or ""),
            host=parts.hostname or "127.0.0.1",
            port=parts.port or 5432,
            database=parts.path.lstrip("/"),
        )

    @property
    def local(self) -> bool:
        return self.host in ("127.0.0.1", "localhost", "::1")


def _run(args: list[str], *, input_text: str | None = None) -> str:
    result = subprocess.run(
        args, capture_output=True, text=True, input=input_text, check=False
    )
    if result.returncode != 0:
        raise ServiceError(f"{' '.join(args[:3])} failed: {result.stderr.strip()}")
    return result.stdout


def _as_postgres(*args: str) -> list[str]:
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--", *args]
    return ["sudo", "-n", "-u", "postgres", *args]


def installed_version() -> str | None:
    root = "/usr/lib/postgresql"
    if not os.path.isdir(root):
        return None
    versions = sorted((v for v in os.listdir(root) if v.isdigit()), key=int)
    return versions[-1] if versions else None


def install() -> str:
    version = installed_version()
    if version:
        return version
    apt_install(
        ["postgresql"],
        "PostgreSQL is not installed; install postgresql yourself or point "
        "DATABASE_URL at a running server",
    )
    version = installed_version()
    if not version:
        raise ServiceError(
            "apt-get installed postgresql but no server version was found"
        )
    return version


def cluster_state(version: str, cluster: str = "main") -> tuple[int, str] | None:
    """(port, status) of a cluster, or None when it does not exist."""
    out = _run(["pg_lsclusters", "--no-header"])
    for line in out.splitlines():
        fields = line.split()
        if len(fields) >= 4 and fields[0] == version and fields[1] == cluster:
            return int(fields[2]), fields[3]
    return None


def ensure_running(port: int = 5432, cluster: str = "main") -> bool:
    """Install, create and start the cluster as needed; True if this call started it."""
    version = install()
    state = cluster_state(version, cluster)
    if state is None:
        _run(["pg_createcluster", version, cluster, "--port", str(port)])
        state = cluster_state(version, cluster)
    assert state is not None
    cluster_port, status = state
    if cluster_port != port:
        raise ServiceError(
            f"PostgreSQL cluster {version}/{cluster} listens on {cluster_port}, but "
            f"DATABASE_URL asks for {port}"
        )
    if status == "online":
        return False
    _run(["pg_ctlcluster", "--skip-systemctl-redirect", version, cluster, "start"])
    wait_for(lambda: _ready(port), 60, f"PostgreSQL on port {port}")
    return True


def stop(*, mode: str = "fast", cluster: str = "main") -> bool:
    version = installed_version()
    if not version:
        return False
    state = cluster_state(version, cluster)
    if state is None or state[1] != "online":
        return False
    _run(
        [
            "pg_ctlcluster",
            "--skip-systemctl-redirect",
            version,
            cluster,
            "stop",
            "-m",
            mode,
        ]
    )
    return True


def drop_cluster(cluster: str) -> None:
    """Stop a cluster and delete it, data and all."""
    version = installed_version()
    if version and cluster_state(version, cluster) is not None:
        _run(["pg_dropcluster", "--stop", version, cluster])


def _ready(port: int) -> bool:
    return (
        subprocess.run(
            ["pg_isready", "-q", "-h", "127.0.0.1", "-p", str(port)], check=False
        ).returncode
        == 0
    )


_IDENT = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


def _ident(name: str) -> str:
    if not _IDENT.match(name):
        raise ServiceError(f"unsafe PostgreSQL identifier {name!r}")
    return name


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def superuser_sql(sql: str, *, database: str = "postgres", port: int = 5432) -> str:
    return _run(
        _as_postgres(
            "psql",
            "-X",
            "-q",
            "-At",
            "-v",
            "ON_ERROR_STOP=1",
            "-p",
            str(port),
            "-d",
            database,
        ),
        input_text=sql,
    )


def ensure_database(writer: Conninfo, reader: Conninfo) -> None:
    """Create the roles and the database, and grant the reader SELECT on what the
    writer creates; safe to run again."""
    db, w, r = _ident(writer.database), _ident(writer.user), _ident(reader.user)
    superuser_sql(
        f"""
DO $$ BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = {_literal(w)}) THEN
    CREATE ROLE {w} LOGIN PASSWORD {_literal(writer.password)} CREATEDB;
  END IF;
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = {_literal(r)}) THEN
    CREATE ROLE {r} LOGIN PASSWORD {_literal(reader.password)};
  END IF;
END $$;
""",
        port=writer.port,
    )
    exists = superuser_sql(
        f"SELECT 1 FROM pg_database WHERE datname = {_literal(db)}", port=writer.port
    )
    if not exists.strip():
        create_database(db, owner=w, reader=r, port=writer.port)


def create_database(name: str, *, owner: str, reader: str, port: int = 5432) -> None:
    db, w, r = _ident(name), _ident(owner), _ident(reader)
    superuser_sql(f"CREATE DATABASE {db} OWNER {w}", port=port)
    superuser_sql(
        f"""
REVOKE ALL ON DATABASE {db} FROM PUBLIC;
GRANT CONNECT ON DATABASE {db} TO {w}, {r};
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
GRANT ALL ON SCHEMA public TO {w};
GRANT USAGE ON SCHEMA public TO {r};
ALTER DEFAULT PRIVILEGES FOR ROLE {w} IN SCHEMA public GRANT SELECT ON TABLES TO {r};
""",
        database=db,
        port=port,
    )


def drop_database(name: str, *, port: int = 5432) -> None:
    superuser_sql(f"DROP DATABASE IF EXISTS {_ident(name)} WITH (FORCE)", port=port)
