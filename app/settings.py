"""Streamfold's configuration: one frozen object read from the environment.

Every value is validated at start-up; a bad one raises ``SettingsError`` naming the
variable, so a worker never runs half-configured.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, TypeVar
from urllib.parse import urlsplit

T = TypeVar("T")


class SettingsError(ValueError):
    """A configuration variable is missing, malformed or contradicts another."""

    def __init__(self, variable: str, problem: str) -> None:
        super().__init__(f"{variable}: {problem}")
        self.variable = variable
        self.problem = problem


@dataclass(frozen=True, slots=True, kw_only=True)
class Topics:
    """Topic names, all derived from one optional prefix so tests and tenants can
    run side by side on one broker."""

    prefix: str = ""

    def commands(self, aggregate: str) -> str:
        return f"{self.prefix}{aggregate}.commands"

    def events(self, aggregate: str) -> str:
        return f"{self.prefix}{aggregate}.events"

    @property
    def results(self) -> str:
        return f"{self.prefix}command-results"

    def snapshots(self, aggregate: str) -> str:
        return f"{self.prefix}{aggregate}.snapshots"

    def dead_letter(self, source_topic: str) -> str:
        return f"{source_topic}.dlq"

    @property
    def schemas(self) -> str:
        return f"{self.prefix}_streamfold-schemas"

    @property
    def operator_actions(self) -> str:
        """What operators did to dead letters (re-drive, discard): kept for ever."""
        return f"{self.prefix}operator-actions"


@dataclass(frozen=True, slots=True)
class ApiToken:
    """A caller of the HTTP command API: the user id its commands carry, and the
    bearer token it proves itself with (left out of reprs, so out of logs)."""

    user_id: str
    token: str = field(repr=False)


AGGREGATES = ("orders", "accounts")
PRODUCER_ACKS = "all"


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    bootstrap_servers: str = "127.0.0.1:9092"
    database_url: str = (
        "postgresql://streamfold_writer:streamfold@127.0.0.1:5432/streamfold"
    )
    query_database_url: str = (
        "postgresql://streamfold_reader:streamfold@127.0.0.1:5432/streamfold"
    )
    schema_registry_url: str = "http://127.0.0.1:8081"
    app_id: str = "streamfold"
    topics: Topics = Topics()
    partitions: int = 4
    replication_factor: int = 1
    home: Path = Path.home() / ".streamfold"
    cache: Path = Path.home() / ".cache" / "streamfold"
    web_host: str = "127.0.0.1"
    web_port: int = 6066
    registry_port: int = 8081
    store: str = "rocksdb"
    max_message_bytes: int = 1_048_576
    command_timeout_s: float = 10.0
    # Commands a worker takes at once per aggregate type; 1 = one at a time.
    command_batch: int = 500
    log_level: str = "warning"  # the worker's
    session_timeout_s: float = 10.0
    query_wait_s: float = 2.0
    projections: tuple[str, ...] | None = None
    # Processes the worker runs its Postgres projections in; they share the
    # partitions of each projection's topics (its consumer group).
    projection_processes: int = 1
    # Transactional write processes the worker runs; they share the command
    # partitions through their consumer group.
    write_processes: int = 1
    # The order payment saga (agents/saga.py): off registers nothing.
    saga: bool = True
    saga_timeout_s: float = 30.0
    # How often the write side starts a snapshot of the states that changed (so a
    # lost store is rebuilt from it and the log's tail); 0 takes none.
    snapshot_interval_s: float = 60.0
    registry_host: str = "127.0.0.1"
    # WebSocket push (/ws): connections per worker, subscriptions per connection,
    # messages queued per connection before a connection is dropped as too slow.
    ws_max_connections: int = 100
    ws_max_subscriptions: int = 10
    ws_queue: int = 1000
    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    sasl_password: str | None = None
    ssl_cafile: str | None = None
    # Who may send commands over HTTP (app/rest): none, and the write routes refuse.
    api_tokens: tuple[ApiToken, ...] = field(default=(), repr=False)
    # How many of the newest command results each worker keeps for
    # GET /commands/{id} (read back from command-results at start).
    api_results_kept: int = 100_000
    # Who may act in the operator console (/console: re-drive, discard, replay):
    # none, and the console is read-only.
    operator_tokens: tuple[ApiToken, ...] = field(default=(), repr=False)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Read and validate every variable; raise ``SettingsError`` on the first bad one."""
        env = os.environ if env is None else env

        def get(name: str, parse: Callable[[str, str], T], fallback: T) -> T:
            raw = env.get(name)
            if raw is None or raw == "":
                return fallback
            return parse(name, raw.strip())

        # An unset (or empty) variable leaves the field's default.
        settings = cls(
            **{
                v.field: v.parse(v.name, env[v.name].strip())
                for v in VARIABLES
                if env.get(v.name)
            }
        )
        # Streamfold's promises rest on durable, de-duplicated appends: a producer that
        # may lose or repeat a write is refused rather than quietly weakened.
        get("KAFKA_PRODUCER_ACKS", _one_of(PRODUCER_ACKS), PRODUCER_ACKS)
        get("KAFKA_ENABLE_IDEMPOTENCE", _one_of("true"), "true")
        settings._check_combinations()
        return settings

    def _check_combinations(self) -> None:
        shared = {t.token for t in self.api_tokens} & {
            t.token for t in self.operator_tokens
        }
        if shared:
            # A token that sends commands must not also re-drive dead letters: a
            # leaked client token would otherwise be an operator's.
            raise SettingsError(
                "STREAMFOLD_OPERATOR_TOKENS",
                "a token is also in STREAMFOLD_API_TOKENS; give operators tokens "
                "of their own",
            )
        if self.security_protocol.startswith("SASL_"):
            if not self.sasl_mechanism:
                raise SettingsError(
                    "KAFKA_SASL_MECHANISM",
                    f"required when KAFKA_SECURITY_PROTOCOL={self.security_protocol}",
                )
            for name, value in (
                ("KAFKA_SASL_USERNAME", self.sasl_username),
                ("KAFKA_SASL_PASSWORD", self.sasl_password),
            ):
                if not value:
                    raise SettingsError(
                        name,
                        f"required when KAFKA_SECURITY_PROTOCOL={self.security_protocol}",
                    )
        elif self.sasl_mechanism:
            raise SettingsError(
                "KAFKA_SASL_MECHANISM",
                "set, but KAFKA_SECURITY_PROTOCOL is not SASL_PLAINTEXT or SASL_SSL; "
                "refusing to connect without authentication",
            )

    @property
    def web_url(self) -> str:
        """Where the worker's HTTP server answers: ``http://host:port``."""
        return f"http://{self.web_host}:{self.web_port}"

    def as_env(self) -> dict[str, str]:
        """The environment that makes a child process read these same settings."""
        # An empty token list is written too: a child reads these settings, never a
        # token from the environment it was started in.
        values = ((v, getattr(self, v.field)) for v in VARIABLES)
        return {v.name: v.show(value) for v, value in values if value is not None}

    def kafka_client_config(self) -> dict[str, str]:
        """librdkafka settings shared by every confluent-kafka client Streamfold makes."""
        config = {
            "bootstrap.servers": self.bootstrap_servers,
            "security.protocol": self.security_protocol,
        }
        if self.sasl_mechanism:
            config["sasl.mechanism"] = self.sasl_mechanism
            config["sasl.username"] = self.sasl_username or ""
            config["sasl.password"] = self.sasl_password or ""
        if self.ssl_cafile:
            config["ssl.ca.location"] = self.ssl_cafile
        return config

    def consumer_config(self) -> dict[str, str]:
        """Settings for every consumer of Streamfold's topics: the write side commits
        in Kafka transactions, so nothing reads what an aborted one wrote."""
        return {**self.kafka_client_config(), "isolation.level": "read_committed"}

    def producer_config(self) -> dict[str, str | int | bool]:
        return {
            **self.kafka_client_config(),
            "acks": PRODUCER_ACKS,
            "enable.idempotence": True,
            "linger.ms": 5,
            "message.max.bytes": 2 * self.max_message_bytes + 65_536,
        }


def _hostports(name: str, raw: str) -> str:
    for part in raw.split(","):
        host, sep, port = part.strip().rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise SettingsError(name, f"expected host:port[,host:port...], got {raw!r}")
    return raw


def _postgres_url(name: str, raw: str) -> str:
    parts = urlsplit(raw)
    if parts.scheme not in ("postgresql", "postgres") or not parts.path.strip("/"):
        raise SettingsError(
            name, f"expected postgresql://user:password@host:port/database, got {raw!r}"
        )
    return raw


def _http_url(name: str, raw: str) -> str:
    parts = urlsplit(raw)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise SettingsError(name, f"expected an http(s):// URL, got {raw!r}")
    return raw.rstrip("/")


_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,100}$")


def _name(name: str, raw: str) -> str:
    if not _NAME.match(raw):
        raise SettingsError(
            name, f"expected letters, digits, '.', '_' or '-', got {raw!r}"
        )
    return raw


def _prefix(name: str, raw: str) -> str:
    if not re.match(r"^[A-Za-z0-9._-]{1,100}$", raw):
        raise SettingsError(
            name, f"expected letters, digits, '.', '_' or '-', got {raw!r}"
        )
    return raw


PROJECTION_NAMES = ("orders", "ledger", "event_log")


def _projections(name: str, raw: str) -> tuple[str, ...]:
    if raw == "none":
        return ()
    chosen = tuple(part.strip() for part in raw.split(",") if part.strip())
    unknown = [p for p in chosen if p not in PROJECTION_NAMES]
    if unknown:
        raise SettingsError(
            name,
            f"unknown projection(s) {', '.join(unknown)}; known: "
            f"{', '.join(PROJECTION_NAMES)} (or 'none')",
        )
    return chosen


# RFC 6750's b64token: what a bearer token may hold, so any client can send it.
_TOKEN = re.compile(r"[A-Za-z0-9._~+/-]+=*")
MIN_TOKEN_LENGTH = 16


def _api_tokens(name: str, raw: str) -> tuple[ApiToken, ...]:
    """``user_id:token`` pairs, comma-separated. Problems name the entry by its
    place, never by the token."""
    found: list[ApiToken] = []
    for number, entry in enumerate(raw.split(","), start=1):
        user_id, sep, token = entry.strip().partition(":")
        where = f"entry {number} of {len(raw.split(','))}"
        if not sep or not user_id:
            raise SettingsError(
                name, f"{where}: expected user_id:token[,user_id:token...]"
            )
        if not user_id.isprintable() or user_id != user_id.strip():
            raise SettingsError(
                name,
                f"{where}: the user id {user_id!r} has unprintable characters "
                "or surrounding whitespace",
            )
        if len(user_id) > 200:
            raise SettingsError(name, f"{where}: the user id is over 200 characters")
        if len(token) < MIN_TOKEN_LENGTH or not _TOKEN.fullmatch(token):
            raise SettingsError(
                name,
                f"{where} (user {user_id!r}): a token must be at least "
                f"{MIN_TOKEN_LENGTH} characters of A-Z a-z 0-9 - . _ ~ + / "
                "(then any '=')",
            )
        if any(other.token == token for other in found):
            raise SettingsError(
                name, f"{where} (user {user_id!r}): the same token is listed twice"
            )
        found.append(ApiToken(user_id, token))
    return tuple(found)


def _text(name: str, raw: str) -> str:
    return raw


def _path(name: str, raw: str) -> Path:
    return Path(raw).expanduser()


def _existing_file(name: str, raw: str) -> str:
    if not Path(raw).is_file():
        raise SettingsError(name, f"no such file: {raw}")
    return raw


def _int_between(low: int, high: int) -> Callable[[str, str], int]:
    def parse(name: str, raw: str) -> int:
        try:
            value = int(raw)
        except ValueError:
            raise SettingsError(name, f"expected a whole number, got {raw!r}") from None
        if not low <= value <= high:
            raise SettingsError(
                name, f"must be between {low:g} and {high:g}, got {raw}"
            )
        return value

    return parse


def _float_between(low: float, high: float) -> Callable[[str, str], float]:
    def parse(name: str, raw: str) -> float:
        try:
            value = float(raw)
        except ValueError:
            raise SettingsError(
                name, f"expected a number of seconds, got {raw!r}"
            ) from None
        if not low <= value <= high:
            raise SettingsError(
                name, f"must be between {low:g} and {high:g}, got {raw}"
            )
        return value

    return parse


# A saga waits at most a day for the account's answer.
MAX_SAGA_TIMEOUT_S = 86_400.0
# Processes one projection may run in, in the worker or a replay.
MAX_PROJECTION_PROCESSES = 64
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


def _one_of(*choices: str) -> Callable[[str, str], str]:
    def parse(name: str, raw: str) -> str:
        if raw not in choices:
            raise SettingsError(
                name, f"must be one of {', '.join(choices)}, got {raw!r}"
            )
        return raw

    return parse


def _tokens(tokens: tuple[ApiToken, ...]) -> str:
    return ",".join(f"{t.user_id}:{t.token}" for t in tokens)


class Variable(NamedTuple):
    """An environment variable: the setting it fills, how it is read (raising
    ``SettingsError``) and how a child process is handed the value."""

    name: str
    field: str
    parse: Callable[[str, str], Any]
    show: Callable[[Any], str] = str


_PORT = _int_between(1, 65535)
_PROCESSES = _int_between(1, MAX_PROJECTION_PROCESSES)

VARIABLES = (
    Variable("KAFKA_BOOTSTRAP_SERVERS", "bootstrap_servers", _hostports),
    Variable("DATABASE_URL", "database_url", _postgres_url),
    Variable("QUERY_DATABASE_URL", "query_database_url", _postgres_url),
    Variable("SCHEMA_REGISTRY_URL", "schema_registry_url", _http_url),
    Variable("STREAMFOLD_APP_ID", "app_id", _name),
    Variable(
        "STREAMFOLD_TOPIC_PREFIX",
        "topics",
        lambda name, raw: Topics(prefix=_prefix(name, raw)),
        lambda topics: str(topics.prefix),
    ),
    Variable("STREAMFOLD_PARTITIONS", "partitions", _int_between(1, 1024)),
    Variable(
        "STREAMFOLD_REPLICATION_FACTOR", "replication_factor", _int_between(1, 16)
    ),
    Variable("STREAMFOLD_HOME", "home", _path),
    Variable("STREAMFOLD_CACHE", "cache", _path),
    Variable("STREAMFOLD_WEB_HOST", "web_host", _name),
    Variable("STREAMFOLD_WEB_PORT", "web_port", _PORT),
    Variable("STREAMFOLD_REGISTRY_PORT", "registry_port", _PORT),
    Variable("STREAMFOLD_REGISTRY_HOST", "registry_host", _name),
    Variable("STREAMFOLD_STORE", "store", _one_of("rocksdb", "memory")),
    Variable(
        "STREAMFOLD_MAX_MESSAGE_BYTES",
        "max_message_bytes",
        _int_between(1024, 100 * 1_048_576),
    ),
    Variable(
        "STREAMFOLD_COMMAND_TIMEOUT", "command_timeout_s", _float_between(0.1, 3600)
    ),
    Variable("STREAMFOLD_COMMAND_BATCH", "command_batch", _int_between(1, 10_000)),
    Variable(
        "STREAMFOLD_LOG_LEVEL",
        "log_level",
        lambda name, raw: _one_of(*LOG_LEVELS)(name, raw.lower()),
    ),
    Variable("STREAMFOLD_SESSION_TIMEOUT", "session_timeout_s", _float_between(6, 300)),
    Variable("STREAMFOLD_QUERY_WAIT", "query_wait_s", _float_between(0, 60)),
    Variable(
        "STREAMFOLD_PROJECTIONS",
        "projections",
        _projections,
        lambda chosen: ",".join(chosen) or "none",
    ),
    Variable("STREAMFOLD_PROJECTION_PROCESSES", "projection_processes", _PROCESSES),
    Variable("STREAMFOLD_WRITE_PROCESSES", "write_processes", _PROCESSES),
    Variable(
        "STREAMFOLD_SAGA",
        "saga",
        lambda name, raw: _one_of("on", "off")(name, raw) == "on",
        lambda on: "on" if on else "off",
    ),
    Variable(
        "STREAMFOLD_SAGA_TIMEOUT",
        "saga_timeout_s",
        _float_between(0.001, MAX_SAGA_TIMEOUT_S),
    ),
    Variable(
        "STREAMFOLD_SNAPSHOT_INTERVAL", "snapshot_interval_s", _float_between(0, 86_400)
    ),
    Variable(
        "STREAMFOLD_WS_MAX_CONNECTIONS", "ws_max_connections", _int_between(1, 100_000)
    ),
    Variable(
        "STREAMFOLD_WS_MAX_SUBSCRIPTIONS",
        "ws_max_subscriptions",
        _int_between(1, 1_000),
    ),
    # At least two of the feed's batches (app.adapters.livefeed.BATCH), which arrive
    # at once: a client keeping up is never dropped.
    Variable("STREAMFOLD_WS_QUEUE", "ws_queue", _int_between(200, 1_000_000)),
    Variable(
        "KAFKA_SECURITY_PROTOCOL",
        "security_protocol",
        _one_of("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"),
    ),
    Variable(
        "KAFKA_SASL_MECHANISM",
        "sasl_mechanism",
        _one_of("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"),
    ),
    Variable("KAFKA_SASL_USERNAME", "sasl_username", _text),
    Variable("KAFKA_SASL_PASSWORD", "sasl_password", _text),
    Variable("KAFKA_SSL_CAFILE", "ssl_cafile", _existing_file),
    Variable("STREAMFOLD_API_TOKENS", "api_tokens", _api_tokens, _tokens),
    Variable(
        "STREAMFOLD_API_RESULTS_KEPT",
        "api_results_kept",
        _int_between(100, 10_000_000),
    ),
    Variable("STREAMFOLD_OPERATOR_TOKENS", "operator_tokens", _api_tokens, _tokens),
)
