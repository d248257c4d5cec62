"""The registry's compatibility modes, schema validation and canonical form."""

from __future__ import annotations

import json

import pytest

from app.adapters import compatibility
from app.adapters.compatibility import InvalidSchema, check
from tests.schemas import AMOUNT, ID, record

NOTE_WITH_DEFAULT = {"name": "note", "type": "string", "default": ""}
NOTE = {"name": "note", "type": "string"}
CURRENCY = {"name": "currency", "type": "string"}

V1 = record(ID, AMOUNT)
ADDS_FIELD_WITH_DEFAULT = record(ID, AMOUNT, NOTE_WITH_DEFAULT)
ADDS_FIELD_WITHOUT_DEFAULT = record(ID, AMOUNT, CURRENCY)
DROPS_FIELD_WITHOUT_DEFAULT = record(ID)


@pytest.mark.parametrize("mode", compatibility.MODES)
def test_adding_a_field_with_a_default_passes_every_mode(mode: str) -> None:
    assert check(mode, ADDS_FIELD_WITH_DEFAULT, [V1]) == []


@pytest.mark.parametrize("mode", compatibility.MODES)
def test_the_first_schema_of_a_subject_is_always_compatible(mode: str) -> None:
    assert check(mode, V1, []) == []


# A field added without a default cannot be read from old data (backward); one removed
# that had no default cannot be read by old readers (forward); FULL needs both.
ADDED_FIELD_UNREADABLE = [
    "reader field 'currency' has no default and is missing from writer "
    "schema version 1 (at /fields/2)"
]
REMOVED_FIELD_UNREADABLE = [
    "reader field 'amount' of schema version 1 has no default and is missing "
    "from the new writer schema (at /fields/1)"
]


@pytest.mark.parametrize(
    ("mode", "adding", "removing"),
    [
        ("BACKWARD", ADDED_FIELD_UNREADABLE, []),
        ("BACKWARD_TRANSITIVE", ADDED_FIELD_UNREADABLE, []),
        ("FORWARD", [], REMOVED_FIELD_UNREADABLE),
        ("FORWARD_TRANSITIVE", [], REMOVED_FIELD_UNREADABLE),
        ("FULL", ADDED_FIELD_UNREADABLE, REMOVED_FIELD_UNREADABLE),
        ("FULL_TRANSITIVE", ADDED_FIELD_UNREADABLE, REMOVED_FIELD_UNREADABLE),
        ("NONE", [], []),
    ],
)
def test_adding_or_removing_a_field_without_default(
    mode: str, adding: list[str], removing: list[str]
) -> None:
    assert check(mode, ADDS_FIELD_WITHOUT_DEFAULT, [V1]) == adding
    assert check(mode, DROPS_FIELD_WITHOUT_DEFAULT, [V1]) == removing


@pytest.mark.parametrize(
    ("mode", "history", "new", "problem"),
    [
        # v2 gave `note` a default; the new schema takes it away again, which v2's
        # data survives but v1's (written without `note`) does not.
        (
            "BACKWARD",
            [V1, record(ID, AMOUNT, NOTE_WITH_DEFAULT)],
            record(ID, AMOUNT, NOTE),
            "reader field 'note' has no default and is missing from writer schema "
            "version 1 (at /fields/2)",
        ),
        # v1 readers need `note`; v2 readers default it; the new writer drops it.
        (
            "FORWARD",
            [record(ID, NOTE), record(ID, NOTE_WITH_DEFAULT)],
            record(ID),
            "reader field 'note' of schema version 1 has no default and is missing "
            "from the new writer schema (at /fields/1)",
        ),
    ],
    ids=["backward", "forward"],
)
def test_a_mode_checks_only_the_latest_and_its_transitive_one_checks_all(
    mode: str, history: list[str], new: str, problem: str
) -> None:
    assert check(mode, new, history) == []
    assert check(f"{mode}_TRANSITIVE", new, history) == [problem]


def test_full_transitive_reports_both_directions_for_every_version() -> None:
    history = [record(ID, NOTE), record(ID, NOTE_WITH_DEFAULT)]
    new = record(ID, CURRENCY)
    assert check("FULL", new, history) == [
        "reader field 'currency' has no default and is missing from writer schema "
        "version 2 (at /fields/1)"
    ]
    assert check("FULL_TRANSITIVE", new, history) == [
        "reader field 'currency' has no default and is missing from writer schema "
        "version 2 (at /fields/1)",
        "reader field 'currency' has no default and is missing from writer schema "
        "version 1 (at /fields/1)",
        "reader field 'note' of schema version 1 has no default and is missing "
        "from the new writer schema (at /fields/1)",
    ]


def test_messages_use_the_given_version_numbers() -> None:
    messages = check("BACKWARD", ADDS_FIELD_WITHOUT_DEFAULT, [V1], versions=[7])
    assert "writer schema version 7" in messages[0]


def test_type_changes_name_the_field_and_promotions_pass() -> None:
    as_int = record(ID, {"name": "amount", "type": "int"})
    as_string = record(ID, {"name": "amount", "type": "string"})
    # int widens to long when read: backward compatible, not forward.
    assert check("BACKWARD", V1, [as_int]) == []
    assert check("FORWARD", V1, [as_int]) == [
        "field 'amount' of schema version 1: reader type: int not compatible with "
        "writer type: long in the new writer schema (at /fields/1/type)"
    ]
    assert check("BACKWARD", as_string, [V1]) == [
        "field 'amount': reader type: string not compatible with writer type: long "
        "in writer schema version 1 (at /fields/1/type)"
    ]
    assert check("NONE", as_string, [V1]) == []


def test_several_problems_are_each_named() -> None:
    new = record(ID, {"name": "amount", "type": "string"}, NOTE, CURRENCY)
    assert sorted(check("BACKWARD", new, [V1])) == [
        "field 'amount': reader type: string not compatible with writer type: long "
        "in writer schema version 1 (at /fields/1/type)",
        "reader field 'currency' has no default and is missing from writer schema "
        "version 1 (at /fields/3)",
        "reader field 'note' has no default and is missing from writer schema "
        "version 1 (at /fields/2)",
    ]


def test_nested_fields_are_named_by_path_even_inside_unions() -> None:
    line = {
        "type": "record",
        "name": "Line",
        "fields": [{"name": "sku", "type": "string"}],
    }
    wider = {**line, "fields": [*line["fields"], {"name": "quantity", "type": "int"}]}
    old = record(ID, {"name": "line", "type": ["null", line]})
    new = record(ID, {"name": "line", "type": wider})
    assert sorted(check("BACKWARD", new, [old])) == [
        "field 'line': reader type: record not compatible with writer type: null in "
        "writer schema version 1 (at /fields/1/type)",
        "reader field 'line.quantity' has no default and is missing from writer "
        "schema version 1 (at /fields/1/type/fields/1)",
    ]


def test_enum_fixed_name_and_union_problems() -> None:
    status = {"type": "enum", "name": "Status", "symbols": ["OPEN", "PAID"]}
    fewer = {**status, "symbols": ["OPEN"]}
    assert check(
        "BACKWARD",
        record(ID, {"name": "status", "type": fewer}),
        [record(ID, {"name": "status", "type": status})],
    ) == [
        "enum 'status' lacks symbols {'PAID'} that writer schema version 1 can write, "
        "and has no default (at /fields/1/type/symbols)"
    ]
    with_default = {**fewer, "default": "OPEN"}
    assert (
        check(
            "BACKWARD",
            record(ID, {"name": "status", "type": with_default}),
            [record(ID, {"name": "status", "type": status})],
        )
        == []
    )
    assert check(
        "BACKWARD",
        json.dumps({"type": "fixed", "name": "Hash", "size": 32}),
        [json.dumps({"type": "fixed", "name": "Hash", "size": 16})],
    ) == [
        "fixed 'Hash' differs in size from writer schema version 1 "
        "(expected: 16, found: 32) (at /size)"
    ]
    assert check("BACKWARD", record(ID, AMOUNT, name="Renamed"), [V1]) == [
        "name of 'streamfold.orders.Renamed' does not match writer schema version 1 "
        "(expected: streamfold.orders.OrderPlaced) (at /name)"
    ]
    assert check(
        "BACKWARD",
        record(ID, {"name": "ref", "type": ["null", "string"]}),
        [record(ID, {"name": "ref", "type": ["null", "long"]})],
    ) == [
        "field 'ref': reader union lacking writer type: LONG in writer schema "
        "version 1 (at /fields/1/type/1)"
    ]


def test_unknown_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown compatibility mode 'SIDEWAYS'"):
        check("SIDEWAYS", V1, [V1])


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("", "empty schema"),
        ("{", "not JSON"),
        ('{"type": "recrod", "name": "A", "fields": []}', "recrod"),
        ('{"type": "record", "name": "1A", "fields": []}', "1A"),
        ('{"type": "record", "name": "A"}', "fields"),
        (
            '{"type": "record", "name": "A", "fields": '
            '[{"name": "n", "type": "int", "default": "x"}]}',
            "Default value <x> must match schema type: int",
        ),
        (
            '{"type": "record", "name": "A", "fields": [{"name": "b", "type": "B"}]}',
            "B",
        ),
        ('["null", "null"]', "null"),
    ],
)
def test_invalid_schemas_are_refused_with_the_reason(text: str, problem: str) -> None:
    with pytest.raises(InvalidSchema, match=r"^Invalid Avro schema: ") as raised:
        compatibility.parse(text)
    assert problem in str(raised.value)


def test_canonical_form_ignores_layout_but_not_meaning() -> None:
    spaced = json.dumps(json.loads(V1), indent=4)
    reordered = json.dumps(
        {
            "fields": [ID, {"type": {"type": "long"}, "name": "amount"}],
            "namespace": "streamfold.orders",
            "name": "OrderPlaced",
            "type": "record",
        }
    )
    canonical = compatibility.canonical_form(V1)
    assert compatibility.canonical_form(spaced) == canonical
    assert compatibility.canonical_form(reordered) == canonical
    with_default = record(ID, {**AMOUNT, "default": 0})
    assert compatibility.canonical_form(with_default) != canonical
