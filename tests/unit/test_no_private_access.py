"""Streamfold never reaches into a library's private attributes (faust, aiokafka,
mode, confluent_kafka): what a library does not offer through its public API is a
sign to use another part of it. Checked over ``app/`` and ``agents/``: no
``obj._name`` outside the object's own class (``self``/``cls``), and no import of a
private name; librdkafka's error codes (``KafkaError._PARTITION_EOF``) are public
constants that merely start with an underscore."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LIBRARIES = ("faust", "aiokafka", "mode", "confluent_kafka")
CONSTANT = re.compile(r"^_[A-Z0-9_]+$")


# The standard library's own documented underscore names.
STDLIB = {"_exit", "_replace", "_asdict", "_fields"}


def _defined(sources: list[str]) -> set[str]:
    """Underscore names Streamfold defines itself: functions, classes, and
    attributes it assigns."""
    names: set[str] = set()
    for source in sources:
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                names.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.add(node.attr)
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                names.add(node.value)  # __slots__ entries
    return {name for name in names if name.startswith("_")}


def _findings(source: str, where: str, own: set[str]) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute):
            name = node.attr
            if not name.startswith("_") or name.startswith("__"):
                continue
            if name in own or name in STDLIB or CONSTANT.match(name):
                continue
            found.append(f"{where}:{node.lineno}: .{name}")
        elif (
            isinstance(node, ast.ImportFrom)
            and node.module
            and node.module.split(".")[0] in LIBRARIES
        ):
            found += [
                f"{where}:{node.lineno}: import {alias.name} from {node.module}"
                for alias in node.names
                if alias.name.startswith("_")
            ]
    return found


def test_the_check_finds_private_access() -> None:
    sample = (
        "from faust.streams import _current_event\n"
        "consumer._fetch_max_wait_ms = 50\n"
        "self._mine = 1\n"
        "print(self._mine)\n"
        "app.producer._ensure_producer()\n"
        "if code == KafkaError._PARTITION_EOF: pass\n"
    )
    own = _defined(["self._mine = 1\n"])
    assert sorted(_findings(sample, "sample", own)) == [
        "sample:1: import _current_event from faust.streams",
        "sample:2: ._fetch_max_wait_ms",
        "sample:5: ._ensure_producer",
    ]


def test_app_and_agents_use_public_apis_only() -> None:
    paths = [p for f in ("app", "agents") for p in sorted((ROOT / f).rglob("*.py"))]
    sources = {path: path.read_text() for path in paths}
    own = _defined(list(sources.values()))
    found = []
    for path, source in sources.items():
        found += _findings(source, str(path.relative_to(ROOT)), own)
    assert found == []
