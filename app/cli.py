"""`streamfold`: the one console command for everything an operator does."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from app.local.process import ServiceError
from app.settings import Settings, SettingsError

REPO = Path(__file__).resolve().parents[1]


def cmd_up(settings: Settings, args: argparse.Namespace) -> int:
    """Start Kafka, PostgreSQL and the schema registry; provision topics and tables."""
    from app.local import stack

    stack.up(settings)
    if args.worker:
        from app.local.worker import WorkerProcess

        fresh = WorkerProcess(settings).start()
        print(
            f"worker    {'started' if fresh else 'running'}  "
            f"http://{settings.web_host}:{settings.web_port}"
        )
    return 0


def cmd_down(settings: Settings, args: argparse.Namespace) -> int:
    """Stop what `up` started (PostgreSQL too unless --keep-postgres)."""
    from app.local import stack

    stack.down(settings, postgres_too=not args.keep_postgres)
    return 0


def cmd_test(settings: Settings, args: argparse.Namespace) -> int:
    """Bring the services up, then run the whole test suite against them."""
    from app.local import stack

    stack.up(settings)
    pytest_args = list(args.pytest_args) or ["-q"]
    return subprocess.call([sys.executable, "-m", "pytest", *pytest_args], cwd=REPO)


def cmd_kafka_tool(settings: Settings, args: argparse.Namespace) -> int:
    """Run one of Kafka's own tools (consumer-groups, topics, ...) from the pinned jars."""
    from app.local import stack

    node = stack.kafka_node(settings)
    node.resolve()
    return subprocess.call(node.java(_tool_class(args.tool), *args.tool_args))


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
        name: str,
        handler: Callable[[Settings, argparse.Namespace], int],
        **kwargs: object,
    ) -> argparse.ArgumentParser:
        command = sub.add_parser(name, help=(handler.__doc__ or "").strip(), **kwargs)  # type: ignore[arg-type]
        command.set_defaults(handler=handler)
        return command

    up = add("up", cmd_up)
    up.add_argument("--worker", action="store_true", help="also start the worker")
    down = add("down", cmd_down)
    down.add_argument("--keep-postgres", action="store_true")
    test = add("test", cmd_test)
    test.add_argument("pytest_args", nargs=argparse.REMAINDER)
    tool = add("kafka-tool", cmd_kafka_tool)
    tool.add_argument("tool", help="consumer-groups, topics, configs, acls, ...")
    tool.add_argument("tool_args", nargs=argparse.REMAINDER)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = Settings.from_env()
        return int(args.handler(settings, args))
    except SettingsError as error:
        print(f"streamfold: configuration error: {error}", file=sys.stderr)
        return 2
    except ServiceError as error:
        print(f"streamfold: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
