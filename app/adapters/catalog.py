"""The schema catalog: the ``schemas/`` tree read into self-contained Avro schemas.

It needs no network; the codec registers what it holds and reads old events through it.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import importlib.util
import json
import re
import sys
from collections.abc import Callable, Mapping
from functools import cache, partial
from pathlib import Path
from types import ModuleType
from typing import Any

import fastavro
from fastavro.schema import to_parsing_canonical_form

Upcaster = Callable[[dict[str, Any]], dict[str, Any]]

COMPATIBILITY = "BACKWARD_TRANSITIVE"
METADATA = "streamfold.EventMetadata"
ENVELOPE = "streamfold.CommandEnvelope"

_VERSION_FILE = re.compile(r"v([1-9][0-9]*)\.avsc")
_UPCASTER = re.compile(r"upcast_v([0-9]+)_to_v([0-9]+)")
_PRIMITIVES = frozenset(
    {"null", "boolean", "int", "long", "float", "double", "bytes", "string"}
)
_NAMED = frozenset({"record", "error", "enum", "fixed"})


class UnknownRecord(KeyError):
    """A record name (or version) the catalog does not hold."""

    def __str__(self) -> str:
        # KeyError would print the repr of its argument, quotes and all.
        return str(self.args[0])


class UpcastError(ValueError):
    """Old data could not be brought to the latest version."""


def namespace(area: str) -> str:
    """The Avro namespace of an area folder: ``common`` is the root one."""
    return "streamfold" if area == "common" else f"streamfold.{area}"


def short_name(full_name: str) -> str:
    """``streamfold.orders.OrderCreated`` → ``OrderCreated``."""
    return full_name.rpartition(".")[2]


def record_name(cls: type) -> str:
    """The record full name of a domain class: its area's namespace and class name."""
    parts = cls.__module__.split(".")
    if len(parts) < 3 or parts[:2] != ["app", "domain"]:
        raise UnknownRecord(f"{cls.__qualname__} is not a domain class of app.domain")
    return f"{namespace(parts[2])}.{cls.__name__}"


def domain_class(full_name: str) -> type:
    """The domain command, event or value class recorded as ``full_name``."""
    try:
        return _domain_table()[full_name][0]
    except KeyError:
        raise UnknownRecord(f"no domain class is recorded as {full_name!r}") from None


def kind(full_name: str) -> str | None:
    """``"event"``, ``"command"``, ``"value"`` for domain records; else ``None``."""
    entry = _domain_table().get(full_name)
    return None if entry is None else entry[1]


class SchemaCatalog:
    """Every record's versions, inlined into self-contained schemas, and its upcasters.

    Build it with :meth:`load`. Problems found while reading (a file that does not
    parse, a name that does not match its folder, a reference to no known record) are
    collected in :attr:`problems` rather than raised; ``check_catalog`` reports them.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.problems: list[str] = []
        self._raw: dict[str, dict[int, dict[str, Any]]] = {}
        self._paths: dict[tuple[str, int], Path] = {}
        self._dirs: dict[str, Path] = {}
        self._schemas: dict[str, dict[int, str]] = {}
        self._parsed: dict[tuple[str, int], dict[str, Any]] = {}
        self._named: dict[tuple[str, int], dict[str, Any]] = {}
        self._canonical: dict[str, tuple[str, int]] = {}
        self._latest: dict[str, int] = {}
        self._short: dict[str, str | None] = {}
        self._upcasters: dict[str, dict[tuple[int, int], tuple[str, Upcaster]]] = {}
        self._steps: dict[str, tuple[Upcaster, ...]] = {}
        self._references: dict[tuple[str, int], tuple[str, ...]] = {}

    @classmethod
    def load(cls, root: Path | None = None) -> SchemaCatalog:
        """Read ``root`` (default: the installed ``schemas`` package)."""
        package = _package_root()
        if root is None:
            root = package or _SOURCE_ROOT
        root = Path(root)
        catalog = cls(root)
        as_package = package is not None and root.resolve() == package
        catalog._read_tree(import_as_package=as_package)
        catalog._inline_all()
        catalog._prepare_steps()
        return catalog

    # -- lookups --------------------------------------------------------------------

    def names(self) -> tuple[str, ...]:
        """Full names of every record that has at least one readable version."""
        return tuple(sorted(self._schemas))

    def __contains__(self, name: object) -> bool:
        return name in self._schemas

    def full_name(self, name: str) -> str:
        """``name`` itself if it is a full name, else the one record with that short name."""
        if name in self._schemas:
            return name
        full = self._short.get(name)
        if full is None:
            reason = "is ambiguous" if name in self._short else "is not in the catalog"
            raise UnknownRecord(f"record {name!r} {reason}")
        return full

    def versions(self, name: str) -> tuple[int, ...]:
        return tuple(sorted(self._versions(name)))

    def latest_version(self, name: str) -> int:
        try:
            return self._latest[name]
        except KeyError:
            raise UnknownRecord(f"record {name!r} is not in the catalog") from None

    def schema(self, name: str, version: int | None = None) -> str:
        """The self-contained schema JSON of ``name`` at ``version`` (default latest):
        the records its file refers to are defined inline, at their latest version."""
        versions = self._versions(name)
        version = self._latest[name] if version is None else version
        try:
            return versions[version]
        except KeyError:
            raise UnknownRecord(f"{name} has no version {version}") from None

    def parsed(self, name: str, version: int | None = None) -> dict[str, Any]:
        """The fastavro-parsed schema of ``name`` at ``version`` (default latest)."""
        version = self.latest_version(name) if version is None else version
        try:
            return self._parsed[(name, version)]
        except KeyError:
            raise UnknownRecord(f"{name} has no version {version}") from None

    def path(self, name: str, version: int) -> Path:
        """The ``.avsc`` file a version was read from."""
        try:
            return self._paths[(name, version)]
        except KeyError:
            raise UnknownRecord(f"{name} has no version {version}") from None

    def raw(self, name: str, version: int) -> dict[str, Any]:
        """A version's JSON as written in its file, references not inlined."""
        return copy.deepcopy(self._raw[name][version])

    def references(self, name: str, version: int) -> tuple[str, ...]:
        """The other records a version's file refers to, by full name; each stands for
        its latest version, as in :meth:`schema`."""
        try:
            return self._references[(name, version)]
        except KeyError:
            raise UnknownRecord(f"{name} has no version {version}") from None

    def identify(self, schema: str) -> tuple[str, int] | None:
        """The (full name, version) whose Parsing Canonical Form equals ``schema``'s."""
        try:
            canonical = to_parsing_canonical_form(json.loads(schema))
        except Exception:  # noqa: BLE001 - any text that does not parse is simply not ours
            return None
        return self._canonical.get(canonical)

    def upcast(
        self, name: str, from_version: int, data: dict[str, Any]
    ) -> dict[str, Any]:
        """``data`` written at ``from_version``, brought step by step to the latest.

        Each step vN→vN+1 is the record's ``upcast_vN_to_vN1`` when it has one, else
        the generic step: keep what vN+1 still has, fill the defaults of what it adds.
        """
        steps = self._steps.get(name)
        if steps is None:
            raise UnknownRecord(f"record {name!r} is not in the catalog")
        if not 1 <= from_version <= len(steps) + 1:
            raise UnknownRecord(f"{name} has no version {from_version}")
        for step in steps[from_version - 1 :]:
            data = step(data)
        return data

    def upcaster_functions(self, name: str) -> dict[tuple[int, int], str]:
        """The upcasters found beside ``name``'s versions: (from, to) → function name."""
        return {k: v[0] for k, v in self._upcasters.get(name, {}).items()}

    def directory(self, name: str) -> Path:
        """The folder holding ``name``'s versions."""
        return self._dirs[name]

    # Domain lookups, as methods too so callers need only the catalog.

    def record_name(self, cls: type) -> str:
        """The record full name of a domain class (see the module's ``record_name``)."""
        name = record_name(cls)
        self._versions(name)  # it must have a schema
        return name

    def class_for(self, name: str) -> type:
        """The domain class recorded as ``name`` (full or unique short name)."""
        return domain_class(self.full_name(name))

    def command_class(self, name: str) -> type:
        """Like ``class_for``, and the class must be a command."""
        full = self.full_name(name)
        if kind(full) != "command":
            raise UnknownRecord(f"{name!r} is not a command")
        return domain_class(full)

    def event_class(self, name: str) -> type:
        """Like ``class_for``, and the class must be an event."""
        full = self.full_name(name)
        if kind(full) != "event":
            raise UnknownRecord(f"{name!r} is not an event")
        return domain_class(full)

    def _versions(self, name: str) -> dict[int, str]:
        try:
            return self._schemas[name]
        except KeyError:
            raise UnknownRecord(f"record {name!r} is not in the catalog") from None

    # -- loading --------------------------------------------------------------------

    def _read_tree(self, *, import_as_package: bool) -> None:
        if not self.root.is_dir():
            self.problems.append(f"{self.root}: the schema folder does not exist")
            return
        for area_dir in _subdirs(self.root):
            for record_dir in _subdirs(area_dir):
                self._read_record(area_dir.name, record_dir, import_as_package)

    def _read_record(self, area: str, folder: Path, import_as_package: bool) -> None:
        full = f"{namespace(area)}.{folder.name}"
        self._dirs[full] = folder
        for file in sorted(folder.iterdir()):
            if file.suffix != ".avsc":
                continue
            match = _VERSION_FILE.fullmatch(file.name)
            if match is None:
                self.problems.append(
                    f"{file}: a schema file must be named v<N>.avsc (N from 1)"
                )
                continue
            schema = self._read_file(file, area, folder.name)
            if schema is not None:
                version = int(match.group(1))
                self._raw.setdefault(full, {})[version] = schema
                self._paths[(full, version)] = file
        module_file = folder / "upcasters.py"
        if module_file.exists():
            self._read_upcasters(full, area, folder, module_file, import_as_package)

    def _read_file(self, file: Path, area: str, record: str) -> dict[str, Any] | None:
        try:
            schema = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            self.problems.append(f"{file}: not readable JSON ({exc})")
            return None
        if not isinstance(schema, dict) or schema.get("type") != "record":
            self.problems.append(f"{file}: must hold one Avro record")
            return None
        expected = namespace(area)
        if schema.get("name") != record or schema.get("namespace") != expected:
            self.problems.append(
                f"{file}: must declare name {record!r} and namespace {expected!r}, "
                f"not {schema.get('name')!r} in {schema.get('namespace')!r}"
            )
            return None
        return schema

    def _read_upcasters(
        self,
        full: str,
        area: str,
        folder: Path,
        file: Path,
        import_as_package: bool,
    ) -> None:
        try:
            module = _import_upcasters(area, folder, file, import_as_package)
        except Exception as exc:  # noqa: BLE001 - any import failure is a problem to report
            self.problems.append(f"{file}: does not import ({exc!r})")
            return
        found: dict[tuple[int, int], tuple[str, Upcaster]] = {}
        for attr, value in vars(module).items():
            if not attr.startswith("upcast_") or not callable(value):
                continue
            match = _UPCASTER.fullmatch(attr)
            if match is None:
                self.problems.append(
                    f"{file}: {attr} is not named upcast_v<N>_to_v<N+1>"
                )
                continue
            found[(int(match.group(1)), int(match.group(2)))] = (attr, value)
        self._upcasters[full] = found

    def _inline_all(self) -> None:
        latest_raw = {
            name: versions[max(versions)] for name, versions in self._raw.items()
        }
        for name, versions in sorted(self._raw.items()):
            for version, raw in sorted(versions.items()):
                file = self._paths[(name, version)]
                try:
                    inlined = _Inliner(latest_raw).inline(raw)
                except _Unresolved as exc:
                    self.problems.append(
                        f"{file}: refers to {exc.args[0]!r}, which no schema file "
                        "defines"
                    )
                    continue
                self._references[(name, version)] = referenced_names(raw)
                text = json.dumps(inlined, separators=(",", ":"))
                named: dict[str, Any] = {}
                try:
                    # A record schema parses to a dict; fastavro's type for the
                    # result is every form a schema takes (str, list or dict).
                    parsed: dict[str, Any] = fastavro.parse_schema(  # type: ignore[assignment]
                        inlined, named_schemas=named
                    )
                except Exception as exc:  # noqa: BLE001 - fastavro raises several kinds
                    self.problems.append(f"{file}: not a valid Avro schema ({exc})")
                    continue
                self._schemas.setdefault(name, {})[version] = text
                self._parsed[(name, version)] = parsed
                self._named[(name, version)] = named
                canonical = to_parsing_canonical_form(inlined)
                twin = self._canonical.setdefault(canonical, (name, version))
                if twin != (name, version):
                    self.problems.append(
                        f"{file}: has the same canonical form as "
                        f"{self._paths[twin]}; a new version must change the "
                        "written shape"
                    )
        for name, texts in self._schemas.items():
            self._latest[name] = max(texts)
            short = short_name(name)
            self._short[short] = None if short in self._short else name

    def _prepare_steps(self) -> None:
        for name, versions in self._schemas.items():
            upcasters = self._upcasters.get(name, {})
            steps: list[Upcaster] = []
            for version in range(1, max(versions)):
                found = upcasters.get((version, version + 1))
                if found is not None:
                    steps.append(found[1])
                elif (name, version + 1) in self._parsed:
                    steps.append(
                        partial(
                            _conform_record,
                            self._parsed[(name, version + 1)],
                            self._named[(name, version + 1)],
                        )
                    )
                else:
                    steps.append(partial(_missing_step, name, version + 1))
            self._steps[name] = tuple(steps)


def check_catalog(catalog: SchemaCatalog) -> list[str]:
    """Every problem of the catalog, as sentences naming the file; empty when sound.

    Checks: files read cleanly; versions run 1..N; each version is BACKWARD_TRANSITIVE
    compatible with all earlier ones; upcasters join existing adjacent versions; every
    domain command, event and value class has a record whose latest payload fields are
    the dataclass fields.
    """
    # Imported here: the checker is only needed by this gate, never on the hot path.
    from app.adapters import compatibility

    problems = list(catalog.problems)
    for name in catalog.names():
        folder = catalog.directory(name)
        versions = catalog.versions(name)
        expected = tuple(range(1, max(versions) + 1))
        if versions != expected:
            missing = ", ".join(f"v{v}.avsc" for v in expected if v not in versions)
            problems.append(
                f"{folder}: versions must run from v1 without gaps; missing {missing}"
            )
        for index, version in enumerate(versions[1:], start=1):
            file = catalog.path(name, version)
            earlier = [catalog.schema(name, v) for v in versions[:index]]
            try:
                # Messages number the earlier schemas 1, 2, ...: the file versions
                # whenever they are contiguous, which is checked just above.
                messages = compatibility.check(
                    COMPATIBILITY, catalog.schema(name, version), earlier
                )
            except ValueError as exc:
                messages = [str(exc)]
            problems += [
                f"{file}: not {COMPATIBILITY} compatible: {message}"
                for message in messages
            ]
        for (start, end), function in sorted(catalog.upcaster_functions(name).items()):
            if end != start + 1 or start not in versions or end not in versions:
                problems.append(
                    f"{folder / 'upcasters.py'}: {function} must step from an "
                    f"existing version to the next (have {_listing(versions)})"
                )
    problems += _check_domain(catalog)
    return problems


def _check_domain(catalog: SchemaCatalog) -> list[str]:
    problems: list[str] = []
    for full, (cls, kind_) in _domain_table().items():
        where = f"{cls.__module__}.{cls.__qualname__}"
        if full not in catalog:
            area = cls.__module__.split(".")[2]
            problems.append(
                f"{catalog.root / area / cls.__name__ / 'v1.avsc'}: missing; "
                f"{where} has no schema"
            )
            continue
        version = catalog.latest_version(full)
        file = catalog.path(full, version)
        fields = [f["name"] for f in catalog.raw(full, version)["fields"]]
        first = {"event": ("metadata", METADATA), "command": ("envelope", ENVELOPE)}
        expected_first = first.get(kind_)
        if expected_first is not None:
            head = catalog.raw(full, version)["fields"][:1]
            if [(f["name"], f["type"]) for f in head] != [expected_first]:
                problems.append(
                    f"{file}: the first field must be {expected_first[0]!r} of type "
                    f"{expected_first[1]}"
                )
                continue
            fields = fields[1:]
        wanted = [f.name for f in dataclasses.fields(cls)]
        missing = [f for f in wanted if f not in fields]
        extra = [f for f in fields if f not in wanted]
        if missing or extra:
            detail = "; ".join(
                part
                for part in (
                    f"missing {', '.join(missing)}" if missing else "",
                    f"not in the class: {', '.join(extra)}" if extra else "",
                )
                if part
            )
            problems.append(f"{file}: payload fields do not match {where} ({detail})")
    shorts: dict[str, list[str]] = {}
    for name in catalog.names():
        shorts.setdefault(short_name(name), []).append(name)
    for short, names in sorted(shorts.items()):
        if len(names) > 1:
            problems.append(
                f"{', '.join(str(catalog.directory(n)) for n in names)}: the short "
                f"name {short!r} must be unique, since headers carry it"
            )
    return problems


# -- the generic upcasting step ---------------------------------------------------------


def _conform_record(
    schema: dict[str, Any], named: dict[str, Any], data: dict[str, Any]
) -> dict[str, Any]:
    conformed: dict[str, Any] = _conform(
        schema, data, named, short_name(schema["name"])
    )
    return conformed


def _conform(schema: Any, value: Any, named: dict[str, Any], path: str) -> Any:
    """``value`` shaped as ``schema``: fields it lacks get defaults, dropped ones go."""
    if isinstance(schema, str):
        schema = named.get(schema)
        if schema is None:  # a primitive: nothing to fill
            return value
    if isinstance(schema, list):
        branch = _branch(schema, value, named)
        return value if branch is None else _conform(branch, value, named, path)
    kind_ = schema["type"]
    if kind_ in ("record", "error") and isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for field in schema["fields"]:
            key = field["name"]
            if key in value:
                out[key] = _conform(field["type"], value[key], named, f"{path}.{key}")
            elif "default" in field:
                out[key] = copy.deepcopy(field["default"])
            else:
                raise UpcastError(
                    f"{path}.{key} is new and has no default; add an upcaster"
                )
        return out
    if kind_ == "array" and isinstance(value, list):
        items = schema["items"]
        return [
            _conform(items, item, named, f"{path}[{i}]") for i, item in enumerate(value)
        ]
    if kind_ == "map" and isinstance(value, Mapping):
        values = schema["values"]
        return {
            k: _conform(values, v, named, f"{path}[{k!r}]") for k, v in value.items()
        }
    return value


def _branch(union: list[Any], value: Any, named: dict[str, Any]) -> Any:
    """The union branch that ``value`` belongs to, when it is a record or array."""
    resolved = [named.get(b, b) if isinstance(b, str) else b for b in union]
    if isinstance(value, Mapping):
        records = [
            b
            for b in resolved
            if isinstance(b, dict) and b["type"] in ("record", "error")
        ]
        for record in records:
            if set(value) <= {f["name"] for f in record["fields"]}:
                return record
        return records[0] if records else None
    if isinstance(value, list):
        return next(
            (b for b in resolved if isinstance(b, dict) and b["type"] == "array"), None
        )
    return None


def _missing_step(name: str, version: int, data: dict[str, Any]) -> dict[str, Any]:
    raise UpcastError(f"{name} v{version} is missing; data cannot be upcast past it")


# -- reading the tree -------------------------------------------------------------------


class _Unresolved(Exception):
    pass


def inline(schema: dict[str, Any], definitions: Mapping[str, dict[str, Any]]) -> Any:
    """``schema`` made self-contained: each named type it takes from ``definitions``
    (full name → schema JSON) is defined once, at its first use.

    Raises ``UnknownRecord`` naming a type that neither defines.
    """
    try:
        return _Inliner(definitions).inline(schema)
    except _Unresolved as exc:
        raise UnknownRecord(f"no schema defines {exc.args[0]!r}") from None


def referenced_names(schema: dict[str, Any]) -> tuple[str, ...]:
    """Full names of the named types ``schema`` uses but does not define itself, in
    order of first use: what it needs as Confluent schema references."""
    inliner = _Inliner({}, keep_references=True)
    inliner.inline(schema)
    return tuple(inliner.references)


class _Inliner:
    """Replaces references to other files' named types by their definition.

    With ``keep_references`` it leaves them as they are and lists them instead.
    """

    def __init__(
        self,
        definitions: Mapping[str, dict[str, Any]],
        *,
        keep_references: bool = False,
    ) -> None:
        self._definitions = definitions
        self._defined: set[str] = set()
        self._keep = keep_references
        self.references: list[str] = []

    def inline(self, schema: dict[str, Any]) -> Any:
        return self._walk(schema, "")

    def _walk(self, node: Any, ns: str) -> Any:
        if isinstance(node, str):
            if node in _PRIMITIVES:
                return node
            full = node if "." in node or not ns else f"{ns}.{node}"
            if full in self._defined:
                return node
            if self._keep:
                self._defined.add(full)
                self.references.append(full)
                return node
            definition = self._definitions.get(full)
            if definition is None:
                raise _Unresolved(full)
            return self._walk(copy.deepcopy(definition), ns)
        if isinstance(node, list):
            return [self._walk(branch, ns) for branch in node]
        if not isinstance(node, dict):
            return node
        kind_ = node.get("type")
        if kind_ in _NAMED:
            name = str(node["name"])
            if "." in name:
                own_ns = name.rpartition(".")[0]
            else:
                own_ns = str(node.get("namespace", ns))
            full = name if "." in name or not own_ns else f"{own_ns}.{name}"
            self._defined.add(full)
            out = dict(node)
            if "." not in name and own_ns != ns:
                out["namespace"] = own_ns
            if kind_ in ("record", "error"):
                out["fields"] = [
                    {**field, "type": self._walk(field["type"], own_ns)}
                    for field in node["fields"]
                ]
            return out
        if kind_ == "array":
            return {**node, "items": self._walk(node["items"], ns)}
        if kind_ == "map":
            return {**node, "values": self._walk(node["values"], ns)}
        if isinstance(kind_, list | dict) or (
            isinstance(kind_, str) and kind_ not in _PRIMITIVES
        ):
            return {**node, "type": self._walk(kind_, ns)}
        return node


def _subdirs(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(("_", "."))
    )


def _import_upcasters(
    area: str, folder: Path, file: Path, import_as_package: bool
) -> ModuleType:
    if import_as_package:
        return importlib.import_module(f"schemas.{area}.{folder.name}.upcasters")
    # A tree outside the package (a test's temporary copy): load the file by path,
    # under a name that cannot shadow the real package.
    name = f"_streamfold_schemas_{abs(hash(str(file)))}.{area}.{folder.name}"
    spec = importlib.util.spec_from_file_location(name, file)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {file}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


# Where the tree sits in a source checkout, for when ``schemas`` is not importable
# (an editable install made before the package was added).
_SOURCE_ROOT = Path(__file__).resolve().parents[2] / "schemas"


def _package_root() -> Path | None:
    try:
        import schemas
    except ImportError:
        return None
    return Path(schemas.__file__).resolve().parent


def _listing(versions: tuple[int, ...]) -> str:
    return ", ".join(f"v{v}" for v in versions) or "none"


@cache
def _domain_table() -> dict[str, tuple[type, str]]:
    """Record full name → (domain class, kind) for every class that has a record."""
    from app.domain import accounts, orders

    entries: list[tuple[type, str]] = [
        *((cls, "event") for cls in (*orders.EVENTS, *accounts.EVENTS)),
        *((cls, "command") for cls in (*orders.COMMANDS, *accounts.COMMANDS)),
        *(
            (cls, "value")
            for cls in (orders.LineItem, orders.OrderLine, orders.Address)
        ),
    ]
    return {record_name(cls): (cls, kind_) for cls, kind_ in entries}
