"""`streamfold`: the one console command for everything an operator does."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from app.local.process import ServiceError
from app.settings import Settings, SettingsError

if TYPE_CHECKING:
    from app.adapters.eventlog import CommandResult

REPO = Path(__file__).resolve().parents[1]


def cmd_up(settings: Settings, args: argparse.Namespace) -> int:
    """Start Kafka, PostgreSQL and the schema registry; provision topics and tables."""
    from app.local import stack

    stack.up(settings)
    if args.worker:
        _start_worker(settings)
    return 0


def _failed(code: int, message: str) -> int:
    """Say on stderr why a command failed; ``code`` is its exit status."""
    print(f"streamfold: {message}", file=sys.stderr)
    return code


def _start_worker(settings: Settings) -> None:
    from app.local.worker import WorkerProcess

    fresh = WorkerProcess(settings).start(timeout=120)
    print(f"worker    {'started' if fresh else 'running'}  {settings.web_url}")


def cmd_down(settings: Settings, args: argparse.Namespace) -> int:
    """Stop what `up` started (PostgreSQL too unless --keep-postgres)."""
    from app.local import stack

    stack.down(settings, postgres_too=not args.keep_postgres)
    return 0


def cmd_test(settings: Settings, args: argparse.Namespace) -> int:
    """Bring the services up, then run the whole test suite against them; with
    --fast, only the tests that need no services (tests/unit), without starting
    any."""
    pytest_args = [a for a in args.pytest_args if a != "--fast"]
    if len(pytest_args) < len(args.pytest_args):
        return subprocess.call(
            [sys.executable, "-m", "pytest", "-q", *pytest_args, "tests/unit"], cwd=REPO
        )
    from app.local import stack

    stack.up(settings)
    if cmd_schemas(settings, args) != 0:
        return 1
    from app.local import browser

    # The operator console's tests drive Debian's Chromium (apt-get, as PostgreSQL).
    browser.install()
    # The suite mostly waits (on groups, sessions, workers starting): four test
    # processes keep two cores busy. Tests are handed out a few at a time, so the
    # slow ones collected first spread over the processes (in the default chunks,
    # the first process would get them all); a module marked with an xdist_group
    # (one deployment for all its tests) goes to one process whole. Arguments of
    # one's own replace these.
    default = ["-q", "-n", "4", "--dist", "loadgroup", "--maxschedchunk", "1"]
    return subprocess.call(
        [sys.executable, "-m", "pytest", *(pytest_args or default)], cwd=REPO
    )


def cmd_kafka_tool(settings: Settings, args: argparse.Namespace) -> int:
    """Run one of Kafka's own tools (consumer-groups, topics, ...) from the pinned jars."""
    from app.local import stack

    node = stack.kafka_node(settings)
    node.resolve()
    return subprocess.call(node.java(_tool_class(args.tool), *args.tool_args))


def cmd_worker(settings: Settings, args: argparse.Namespace) -> int:
    """Run the worker (write processes, projections, web views) in the foreground, or
    start, stop or restart it in the background; the services keep running."""
    from app.local.worker import WorkerProcess

    if args.action == "run":
        from app.writeside import start_write_side

        write = start_write_side(settings)  # before Faust is even imported
        from app import worker

        worker.run(settings, write)
        return 0
    if args.action in ("stop", "restart"):
        stopped = WorkerProcess(settings).stop()
        print(f"worker    {'stopped' if stopped else 'not running'}")
    if args.action in ("start", "restart"):
        _start_worker(settings)
    return 0


def cmd_registry(settings: Settings, args: argparse.Namespace) -> int:
    """Run the schema registry (Confluent REST API) in the foreground."""
    from app.adapters import registry_server

    registry_server.main(settings)
    return 0


def cmd_send(settings: Settings, args: argparse.Namespace) -> int:
    """Send one command and wait for its result (exit 0 accepted, 3 rejected)."""
    import json

    from app.adapters import mapper
    from app.adapters.catalog import SchemaCatalog
    from app.client import CommandClient, CommandTimeout

    catalog = SchemaCatalog.load()
    try:
        cls = catalog.command_class(args.command_type)
    except LookupError as error:
        raise SettingsError("COMMAND", str(error)) from None
    try:
        payload = json.loads(args.payload)
        command: object = mapper.from_dict(cls, payload)
    except (ValueError, mapper.MappingError) as error:
        return _failed(2, f"invalid {args.command_type} payload: {error}")
    with CommandClient(settings, catalog=catalog) as client:
        try:
            result = client.send(
                command,
                timeout=args.timeout,
                command_id=args.command_id,
                user_id=args.user,
                expected_version=args.expected_version,
                correlation_id=args.correlation_id,
            )
        except CommandTimeout as error:
            return _failed(4, str(error))
    print(json.dumps(_result_json(result), indent=2))
    return 0 if result.accepted else 3


def _result_json(result: CommandResult) -> dict[str, object]:
    import dataclasses

    data = dataclasses.asdict(result)
    data["event_ids"] = list(data["event_ids"])
    return data


def cmd_schemas(settings: Settings, args: argparse.Namespace) -> int:
    """Check schemas/ (each version BACKWARD_TRANSITIVE-compatible with the ones
    before it) and that the registry holds every version under its subject."""
    from app.adapters.catalog import SchemaCatalog, check_catalog
    from app.adapters.codec import ConfluentRegistry, RegistryError
    from app.adapters.subjects import check_subjects

    catalog = SchemaCatalog.load()
    problems = check_catalog(catalog)
    count = sum(len(catalog.versions(name)) for name in catalog.names())
    registry = ConfluentRegistry(settings.schema_registry_url)
    try:
        registered = check_subjects(registry, catalog, settings.topics)
    except RegistryError as error:
        registered = [f"{settings.schema_registry_url}: {error}"]
    for problem in [*problems, *registered]:
        print(f"  ✗ {problem}")
    if problems or registered:
        print(
            f"schemas check failed: {len(problems)} problem(s) in {count} schema "
            f"files, {len(registered)} in the registry's subjects"
        )
        return 1
    print(
        f"schemas check passed: {len(catalog.names())} records, {count} versions, "
        "each BACKWARD_TRANSITIVE-compatible with the versions before it and "
        f"registered in order at {settings.schema_registry_url}"
    )
    return 0


def cmd_import(settings: Settings, args: argparse.Namespace) -> int:
    """Append events written elsewhere (JSON Lines, any schema version) to the event
    store; all or nothing, and lines already imported are skipped."""
    from app.importer import ImportRefused, import_events

    try:
        with (
            open(args.file, encoding="utf-8")
            if args.file != "-"
            else sys.stdin as lines
        ):
            done = import_events(settings, lines)
    except OSError as error:
        return _failed(2, f"cannot read {args.file}: {error}")
    except ImportRefused as refused:
        for problem in refused.problems:
            print(f"  ✗ {problem}", file=sys.stderr)
        print(
            f"import refused: {len(refused.problems)} problem(s); nothing was written",
            file=sys.stderr,
        )
        return 1
    print(f"imported {done.written} events ({done.skipped} already in the store)")
    return 0


def cmd_demo(settings: Settings, args: argparse.Namespace) -> int:
    """Bring everything up, drive a demo workload through it, and say what happened."""
    from app import demo

    return demo.run(settings)


def cmd_history(settings: Settings, args: argparse.Namespace) -> int:
    """Print an aggregate's events as a table (or a correlation id's whole flow)."""
    import psycopg

    from app.history import EventStore

    with psycopg.connect(settings.query_database_url) as conn:
        store = EventStore(conn)
        if args.correlation:
            events = store.read_correlation(args.id)
        else:
            kind = store.aggregate_type(args.id, args.type)
            events = store.read_stream(kind, args.id)
    if not events:
        print(f"no events for {args.id}")
        return 1
    print(
        f"{'ver':>4}  {'time (UTC)':<26} {'event':<18} {'schema':>6}  {'event id':<36}  data"
    )
    currencies: dict[str, str] = {}
    for e in events:
        # Amounts are shown in their stream's currency, named by its first event.
        stream = str(e.data.get("order_id") or e.data.get("account_id") or "")
        if isinstance(e.data.get("currency"), str):
            currencies[stream] = e.data["currency"]
        data = _data_column(e.data, currencies.get(stream))
        print(
            f"{e.stream_version:>4}  {e.occurred_at.isoformat():<26} {e.event_type:<18} "
            f"{'v' + str(e.schema_version) if e.schema_version else '-':>6}  "
            f"{e.event_id:<36}  {data[:80]}"
        )
    return 0


def _data_column(data: dict[str, object], currency: str | None) -> str:
    """An event's scalar fields as ``name=value``; amounts in major units."""
    from app.domain.money import fmt

    shown = []
    for name, value in data.items():
        if isinstance(value, list | dict) or (name == "currency" and currency):
            continue
        if currency and name.endswith("_minor") and isinstance(value, int):
            shown.append(f"{name.removesuffix('_minor')}={fmt(value, currency)}")
        else:
            shown.append(f"{name}={value}")
    return ", ".join(shown)


def cmd_state(settings: Settings, args: argparse.Namespace) -> int:
    """Print an aggregate's state now, as of --version N, or as of --at TIME."""
    import json
    from datetime import UTC, datetime

    import psycopg

    from app.adapters import mapper
    from app.history import EventStore

    at = None
    if args.at:
        try:
            at = datetime.fromisoformat(args.at)
        except ValueError:
            raise SettingsError(
                "--at", f"expected an ISO-8601 time, got {args.at!r}"
            ) from None
        at = at if at.tzinfo else at.replace(tzinfo=UTC)
    with psycopg.connect(settings.query_database_url) as conn:
        store = EventStore(conn)
        kind = store.aggregate_type(args.id, args.type)
        state, version = store.state(kind, args.id, version=args.version, at=at)
    print(
        json.dumps(
            {
                "aggregate_type": kind,
                "aggregate_id": args.id,
                "version": version,
                "state": mapper.to_dict(state),
            },
            indent=2,
            default=str,
        )
    )
    return 0


def cmd_status(settings: Settings, args: argparse.Namespace) -> int:
    """Show the services and each projection's position and lag (events, seconds)."""
    import json

    from app.local import stack
    from app.local.process import http_ok

    node = stack.kafka_node(settings)
    print(
        f"kafka     {'up' if node.answers(timeout=3) else 'DOWN'}  {settings.bootstrap_servers}"
    )
    print(
        f"registry  {'up' if http_ok(settings.schema_registry_url + '/subjects') else 'DOWN'}"
        f"  {settings.schema_registry_url}"
    )
    url = f"{settings.web_url}/status"
    try:
        import httpx

        document = httpx.get(url, timeout=5).json()
    except Exception:  # noqa: BLE001 - any failure means the worker is not answering
        print(f"worker    DOWN  {url}")
        return 1
    print(f"worker    up    {url}")
    for projection in document.get("projections", []):
        state = "error: " + projection["error"] if projection["error"] else "ok"
        print(
            f"  {projection['name']:<10} applied {projection['applied']:>8}  "
            f"lag {projection['lag_events']:>6} events  {projection['lag_seconds']:>7.1f}s"
            f"  dead-lettered {projection['dead_lettered']}  {state}"
        )
    if args.json:
        print(json.dumps(document, indent=2))
    return 0


def cmd_replay(settings: Settings, args: argparse.Namespace) -> int:
    """Rebuild a projection from the start of its topics (blue/green unless --in-place)."""
    from app.projections import replay

    return replay.main(
        settings,
        args.projection,
        in_place=args.in_place,
        processes=args.processes,
        progress_every=args.progress_every,
    )


def cmd_audit(settings: Settings, args: argparse.Namespace) -> int:
    """Check every promise against what Kafka and Postgres hold now (reads all topics)."""
    from app import audit

    findings = audit.audit(
        settings, read_models=not args.no_read_models, payments=not args.no_payments
    )
    print(audit.report(findings))
    return 0 if all(f.ok for f in findings) else 1


def cmd_soak(settings: Settings, args: argparse.Namespace) -> int:
    """Run a mixed workload with random faults for a while, then audit everything."""
    import signal

    from app import soak

    # SIGTERM unwinds like Ctrl-C, so the soak's worker, broker and deployment go too.
    signal.signal(signal.SIGTERM, lambda signum, _: sys.exit(128 + signum))
    faults = [f for f in args.faults.split(",") if f] if args.faults else []
    try:
        return soak.run(
            settings,
            minutes=args.minutes,
            rate=args.rate,
            faults=faults,
            seed=args.seed,
            keep=args.keep,
        )
    except ValueError as error:
        raise SettingsError("--faults", str(error)) from error


def cmd_broker_kills(settings: Settings, args: argparse.Namespace) -> int:
    """Exactly once through broker SIGKILLs: the transactional processor on a
    private broker that is killed every 15-40 s; exit 1 unless it held."""
    from app import brokerkills

    outcome = brokerkills.run(
        settings,
        args.minutes,
        args.rate,
        processors=args.processors,
        seed=args.seed,
        every=args.every,
        keeping=args.keeping,
    )
    print(brokerkills.report(outcome))
    return 0 if outcome.ok else 1


def _seconds_between(text: str) -> tuple[float, float]:
    low, _, high = text.partition("-")
    try:
        bounds = float(low), float(high)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected A-B in seconds, e.g. 3-6, got {text!r}"
        ) from None
    if not 0 < bounds[0] <= bounds[1]:
        raise argparse.ArgumentTypeError(f"expected 0 < A <= B, got {text!r}")
    return bounds


def cmd_dlq(settings: Settings, args: argparse.Namespace) -> int:
    """Dead letters: list them, re-drive one (or an aggregate's, in order) to its
    source topic, or discard one with a reason. Actions need an operator token in
    STREAMFOLD_OPERATOR_TOKEN (one of STREAMFOLD_OPERATOR_TOKENS): its user id is
    recorded with the action."""
    from app.adapters.deadletters import (
        DeadLetterError,
        Operations,
        read_overview,
        utc_now,
    )
    from app.deadletters import ActionRefused, checked_reason, standing
    from app.rest.auth import Credentials, Unauthorized

    try:
        if args.action == "list":
            overview = read_overview(settings)
            decided = overview.decided()
            for letter in overview.letters:
                state = standing(letter, decided)
                if args.open and state != "open":
                    continue
                print(
                    f"{letter.id}  {state:<9} {letter.kind:<10} "
                    f"{letter.aggregate_id or '-'}  from {letter.source_topic}"
                    f"[{letter.source_partition}]@{letter.source_offset}: "
                    f"{letter.reason}"
                )
            return 0
        credentials = Credentials(settings.operator_tokens)
        if not credentials.enabled:
            raise SettingsError(
                "STREAMFOLD_OPERATOR_TOKENS", "no operator is configured: read-only"
            )
        try:
            operator = credentials.user_id(
                "Bearer " + os.environ.get("STREAMFOLD_OPERATOR_TOKEN", "")
            )
        except Unauthorized:
            raise SettingsError(
                "STREAMFOLD_OPERATOR_TOKEN",
                "missing, or not one of STREAMFOLD_OPERATOR_TOKENS",
            ) from None
        reason = checked_reason(args.reason, required=args.action == "discard")
        if args.record is None and (args.topic is None or args.aggregate is None):
            raise ActionRefused(400, "give a record, or --topic and --aggregate")
        what = args.record or f"every open record of {args.aggregate} in {args.topic}"
        if not args.yes:
            answer = input(f"{args.action} {what} as {operator}? [y/N] ")
            if answer.strip().lower() not in ("y", "yes"):
                print("nothing done")
                return 1
        operations = Operations(settings, utc_now)
        try:
            actions = operations.act(
                args.action,
                operator,
                reason,
                record=args.record,
                topic=args.topic if args.record is None else None,
                aggregate_id=args.aggregate if args.record is None else None,
            )
        finally:
            operations.close()
        for action in actions:
            landed = f" → {action.produced}" if action.produced else ""
            print(f"{action.verb} {action.record}{landed} by {action.operator}")
        return 0
    except ActionRefused as refused:
        return _failed(3, f"refused: {refused.message}")
    except DeadLetterError as error:
        return _failed(1, f"{error}; nothing was done")


def _tool_class(name: str) -> str:
    from app.local.kafka import TOOLS

    if name not in TOOLS:
        raise SettingsError(
            "tool", f"unknown Kafka tool {name!r}; known: {', '.join(TOOLS)}"
        )
    return TOOLS[name]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="streamfold",
        description="Event sourcing and CQRS on Apache Kafka. Configuration comes from "
        "environment variables (see the README).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(
        name: str, handler: Callable[[Settings, argparse.Namespace], int]
    ) -> argparse.ArgumentParser:
        command = sub.add_parser(name, help=(handler.__doc__ or "").strip())
        command.set_defaults(handler=handler)
        return command

    up = add("up", cmd_up)
    up.add_argument("--worker", action="store_true", help="also start the worker")
    down = add("down", cmd_down)
    down.add_argument("--keep-postgres", action="store_true")
    test = add("test", cmd_test)
    test.add_argument("pytest_args", nargs=argparse.REMAINDER)
    worker = add("worker", cmd_worker)
    worker.add_argument(
        "action",
        nargs="?",
        default="run",
        choices=["run", "start", "stop", "restart"],
        help="run in the foreground (the default), or start, stop or restart the "
        "background worker alone",
    )
    add("registry", cmd_registry)
    send = add("send", cmd_send)
    send.add_argument("command_type", help="a command record name, e.g. CreateOrder")
    send.add_argument("payload", help="the command's fields as JSON")
    send.add_argument("--command-id", help="idempotency key (default: a new UUID)")
    send.add_argument(
        "--expected-version", type=int, help="optimistic concurrency check"
    )
    send.add_argument("--correlation-id")
    send.add_argument("--user", default=os.environ.get("USER"), help="user id")
    send.add_argument("--timeout", type=float, help="seconds to wait for the result")
    schemas = add("schemas", cmd_schemas)
    schemas.add_argument("action", choices=["check"])
    imports = add("import", cmd_import)
    imports.add_argument(
        "file", help="JSON Lines, one event a line (see the README); - for stdin"
    )
    add("demo", cmd_demo)
    status = add("status", cmd_status)
    status.add_argument(
        "--json", action="store_true", help="also print the raw /status"
    )
    history = add("history", cmd_history)
    history.add_argument(
        "id", help="an aggregate id (or a correlation id with --correlation)"
    )
    history.add_argument("--type", choices=["order", "account"])
    history.add_argument("--correlation", action="store_true")
    state = add("state", cmd_state)
    state.add_argument("id")
    state.add_argument("--type", choices=["order", "account"])
    when = state.add_mutually_exclusive_group()
    when.add_argument("--version", type=int)
    when.add_argument("--at", help="ISO-8601 time, e.g. 2026-11-26T09:00:00Z")
    replay = add("replay", cmd_replay)
    replay.add_argument("projection", help="orders, ledger, event_log")
    replay.add_argument(
        "--in-place",
        action="store_true",
        help="empty the live tables and rewind the live group instead of building "
        "new tables beside them",
    )
    replay.add_argument(
        "--processes",
        type=int,
        metavar="N",
        help="processes folding side by side, sharing the topics' partitions "
        "(default: one per core, at most one per partition)",
    )
    replay.add_argument(
        "--progress-every",
        type=float,
        metavar="SECONDS",
        help="a progress line every SECONDS (default: redrawn every 0.2 s on a "
        "terminal, a line every 5 s otherwise)",
    )
    checks = add("audit", cmd_audit)
    checks.add_argument(
        "--no-read-models", action="store_true", help="skip comparing Postgres"
    )
    checks.add_argument(
        "--no-payments", action="store_true", help="skip the payment saga's checks"
    )
    soak = add("soak", cmd_soak)
    soak.add_argument("--minutes", type=float, default=20.0)
    soak.add_argument("--rate", type=float, default=40.0, help="commands per second")
    soak.add_argument(
        "--faults",
        default="worker,broker,postgres",
        help="comma-separated: worker, broker, postgres ('' for none)",
    )
    soak.add_argument("--seed", type=int, default=1)
    soak.add_argument(
        "--keep", action="store_true", help="keep the soak's topics and database"
    )
    kills = add("broker-kills", cmd_broker_kills)
    kills.add_argument("--minutes", type=float, default=10.0)
    kills.add_argument("--rate", type=float, default=4000.0, help="records per second")
    kills.add_argument("--processors", type=int, default=2)
    kills.add_argument("--seed", type=int, default=1)
    kills.add_argument(
        "--every",
        type=_seconds_between,
        default=(15.0, 40.0),
        metavar="A-B",
        help="seconds between kills, drawn between A and B (default 15-40)",
    )
    kills.add_argument(
        "--keeping",
        action="store_true",
        help="echoes that take input again harmlessly, as the write side's "
        "handlers do, and so go on past held offsets",
    )
    dlq = add("dlq", cmd_dlq)
    dlq.add_argument("action", choices=["list", "redrive", "discard"])
    dlq.add_argument(
        "record", nargs="?", help="a dead letter as topic:partition:offset (see list)"
    )
    dlq.add_argument("--open", action="store_true", help="list: only open records")
    dlq.add_argument("--topic", help="redrive: the dead-letter topic of --aggregate")
    dlq.add_argument(
        "--aggregate", help="redrive: every open record of this aggregate, in order"
    )
    dlq.add_argument("--reason", default="", help="kept with the action")
    dlq.add_argument("--yes", action="store_true", help="do not ask to confirm")
    tool = add("kafka-tool", cmd_kafka_tool)
    tool.add_argument("tool", help="consumer-groups, topics, configs, acls, ...")
    tool.add_argument("tool_args", nargs=argparse.REMAINDER)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    # `test` hands everything after it to pytest, options included (`test -k saga`).
    args, extra = parser.parse_known_args(argv)
    if extra and args.command == "test":
        args.pytest_args = [*extra, *args.pytest_args]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        settings = Settings.from_env()
        return int(args.handler(settings, args))
    except SettingsError as error:
        return _failed(2, f"configuration error: {error}")
    except ServiceError as error:
        return _failed(1, str(error))
    except LookupError as error:
        # Unknown or ambiguous aggregate ids, unknown records: the user's input.
        return _failed(1, str(error.args[0] if error.args else error))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
