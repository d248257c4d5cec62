"""The domain imports nothing but the standard library and itself."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

DOMAIN = Path(__file__).resolve().parents[2] / "app" / "domain"


def _imports(path: Path) -> list[tuple[str, int]]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: list[tuple[str, int]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((alias.name, node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.module, node.lineno))
    return found


def _allowed(module: str) -> bool:
    top = module.partition(".")[0]
    return (
        top in sys.stdlib_module_names
        or module == "app.domain"
        or module.startswith("app.domain.")
    )


def test_domain_exists() -> None:
    # Guards the walk below against passing vacuously on a wrong path.
    assert list(DOMAIN.rglob("*.py"))


def test_domain_imports_only_stdlib_and_itself() -> None:
    offenders = [
        f"{path.relative_to(DOMAIN.parents[1])}:{line} imports {module}"
        for path in sorted(DOMAIN.rglob("*.py"))
        for module, line in _imports(path)
        if not _allowed(module)
    ]
    assert not offenders, "app/domain must stay pure:\n" + "\n".join(offenders)


def test_the_walk_catches_a_third_party_import(tmp_path: Path) -> None:
    module = tmp_path / "leaky.py"
    module.write_text(
        "from __future__ import annotations\n"
        "import json\n"
        "from . import sibling\n"
        "from app.domain.errors import DomainError\n"
        "import confluent_kafka\n"
        "from app.adapters import codec\n",
        encoding="utf-8",
    )
    bad = [name for name, _ in _imports(module) if not _allowed(name)]
    assert bad == ["confluent_kafka", "app.adapters"]
