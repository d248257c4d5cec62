"""Dead letters without a broker: what a record says, what re-driving it produces,
how actions decide a record's standing, the console's rendering and refusals."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from app.console import render
from app.console.web import Console, Refused
from app.deadletters import (
    Action,
    ActionRefused,
    DeadLetter,
    chosen,
    parse_record_id,
    redrive_of,
    standing,
    standings,
)
from app.settings import ApiToken, Settings, SettingsError

DLQ = "orders.commands.dlq"
AT = datetime(2026, 12, 3, 9, 0, tzinfo=UTC)
GRACE = ApiToken("grace", "grace-0123456789abcdef01")


def letter(offset: int, key: bytes | None = b"ord-1", **headers: str) -> DeadLetter:
    given = {
        "dlq-source-topic": "orders.commands",
        "dlq-source-partition": "2",
        "dlq-source-offset": str(40 + offset),
        "dlq-reason": "too large",
        **headers,
    }
    return DeadLetter(
        topic=DLQ,
        partition=0,
        offset=offset,
        key=key,
        value=b"\x00\x00\x00\x00\x07payload",
        headers=(
            ("command-type", b"CreateOrder"),
            *((n.replace("_", "-"), v.encode()) for n, v in given.items()),
        ),
        timestamp_ms=1_764_752_400_000,
    )


def action(record: str, verb: Any = "redrive", operator: str = "grace") -> Action:
    return Action(
        action_id="a-" + record,
        at=AT,
        operator=operator,
        verb=verb,
        record=record,
        reason="why",
    )


def test_a_dead_letter_names_its_source_kind_and_aggregate() -> None:
    found = letter(3)
    assert found.id == f"{DLQ}:0:3"
    assert (found.source_topic, found.source_partition, found.source_offset) == (
        "orders.commands",
        2,
        43,
    )
    assert (found.kind, found.reason, found.aggregate_id) == (
        "command",
        "too large",
        "ord-1",
    )
    projection = letter(0, **{"dlq-projection": "orders"})
    assert projection.kind == "projection"
    saga = letter(0, key=None, **{"dlq-source-topic": "app-saga-inbox"})
    assert (saga.kind, saga.aggregate_id) == ("saga", None)


def test_redrive_sends_the_original_bytes_back_where_they_were_read() -> None:
    found = letter(3)
    out = redrive_of(found, "act-1")
    assert (out.topic, out.partition, out.key, out.value) == (
        "orders.commands",
        2,
        b"ord-1",
        found.value,
    )
    assert out.headers == (
        ("command-type", b"CreateOrder"),
        ("streamfold-redriven-from", f"{DLQ}:0:3".encode()),
        ("streamfold-redrive-action", b"act-1"),
    )


def test_a_record_without_its_source_is_not_redriven() -> None:
    bare = DeadLetter(
        topic=DLQ,
        partition=0,
        offset=0,
        key=None,
        value=b"x",
        headers=(),
        timestamp_ms=0,
    )
    with pytest.raises(ActionRefused) as refused:
        redrive_of(bare, "act")
    assert refused.value.status == 409


def test_a_records_first_action_decides_its_standing() -> None:
    records = [letter(0), letter(1), letter(2)]
    decided = standings(
        [
            action(records[0].id, "discard"),
            action(records[0].id, "redrive", operator="late"),
            action(records[1].id),
        ]
    )
    assert [standing(r, decided) for r in records] == [
        "discarded",
        "redriven",
        "open",
    ]
    assert decided[records[0].id].operator == "grace"


def test_chosen_takes_an_open_record_or_an_aggregates_open_records_in_order() -> None:
    records = [letter(5), letter(1, key=b"ord-2"), letter(3), letter(4)]
    decided = standings([action(records[3].id)])
    assert chosen(records, decided, record=records[0].id) == [records[0]]
    # Offsets 3 and 5 are open; 4 is re-driven already; ord-2 is another aggregate.
    assert [
        r.offset for r in chosen(records, decided, topic=DLQ, aggregate_id="ord-1")
    ] == [3, 5]
    with pytest.raises(ActionRefused) as done:
        chosen(records, decided, record=records[3].id)
    assert done.value.status == 409 and "redriven by grace" in done.value.message
    with pytest.raises(ActionRefused) as unknown:
        chosen(records, decided, record=f"{DLQ}:0:99")
    assert unknown.value.status == 404
    with pytest.raises(ActionRefused) as none_open:
        chosen(records, decided, topic=DLQ, aggregate_id="ord-9")
    assert none_open.value.status == 404


def test_actions_round_trip_through_json() -> None:
    done = Action(
        action_id="a",
        at=AT,
        operator="grace",
        verb="redrive",
        record=f"{DLQ}:0:1",
        reason="limit raised",
        produced="orders.commands:2:77",
    )
    assert Action.from_json(done.to_json()) == done
    with pytest.raises(ValueError, match="verb"):
        Action.from_json(done.to_json().replace(b"redrive", b"delete"))


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("orders.commands.dlq:0:12", ("orders.commands.dlq", 0, 12)),
        ("a:b.dlq:3:4", ("a:b.dlq", 3, 4)),
    ],
)
def test_record_ids_parse(text: str, parsed: tuple[str, int, int]) -> None:
    assert parse_record_id(text) == parsed


@pytest.mark.parametrize("text", ["orders.commands.dlq", "t:x:1", ":0:1", "t:0:"])
def test_bad_record_ids_are_refused(text: str) -> None:
    with pytest.raises(ActionRefused):
        parse_record_id(text)


def test_rendering_shows_hex_and_what_decodes() -> None:
    found = letter(3)

    def decode(value: bytes) -> dict[str, Any]:
        raise ValueError("unknown schema id 7")

    shown = render.dead_letter(found, {}, decode)
    assert shown["hex"] == (found.value or b"").hex()
    assert shown["decoded"] == {"error": "ValueError: unknown schema id 7"}
    assert shown["standing"] == "open" and shown["action"] is None
    as_json = render.decoded_value(b'{"order_id": "o-1"}', decode)
    assert as_json == {"format": "json", "data": {"order_id": "o-1"}}
    assert render.header_text(b"\xff\x00") == "0xff00"


def _console(settings: Settings) -> Console:
    return Console(settings, codec=None)  # type: ignore[arg-type]


def test_without_an_operator_token_the_console_is_read_only() -> None:
    console = _console(Settings())
    assert console.session(None) == {"operator": None, "actions_enabled": False}
    with pytest.raises(Refused) as refused:
        console.operator(f"Bearer {GRACE.token}")
    assert refused.value.status == 403
    assert "STREAMFOLD_OPERATOR_TOKENS" in refused.value.error


def test_the_operator_is_the_tokens_user() -> None:
    console = _console(Settings(operator_tokens=(GRACE,)))
    assert console.operator(f"Bearer {GRACE.token}") == "grace"
    for wrong in (None, "Bearer nope-nope-nope-nope", f"Basic {GRACE.token}"):
        with pytest.raises(Refused) as refused:
            console.operator(wrong)
        assert refused.value.status == 401
        assert refused.value.headers["WWW-Authenticate"].startswith("Bearer")


def test_an_action_must_be_confirmed_and_well_formed() -> None:
    console = _console(Settings(operator_tokens=(GRACE,)))
    for body, says in (
        ([], "JSON object"),
        ({"record": f"{DLQ}:0:1"}, "confirmed"),
        ({"record": f"{DLQ}:0:1", "confirmed": "yes"}, "confirmed"),
        ({"confirmed": True}, "either record"),
        ({"confirmed": True, "aggregate_id": "ord-1"}, "topic"),
        ({"confirmed": True, "record": 7}, "record"),
    ):
        with pytest.raises(ActionRefused) as refused:
            console.act("redrive", "grace", body)
        assert refused.value.status == 400 and says in refused.value.message, body
    with pytest.raises(ActionRefused, match="say why"):
        console.act("discard", "grace", {"record": f"{DLQ}:0:1", "confirmed": True})


def test_operator_tokens_are_read_and_kept_apart_from_api_tokens() -> None:
    env = {"STREAMFOLD_OPERATOR_TOKENS": f"grace:{GRACE.token}"}
    settings = Settings.from_env(env)
    assert settings.operator_tokens == (GRACE,)
    assert Settings.from_env(settings.as_env()).operator_tokens == (GRACE,)
    assert GRACE.token not in repr(settings)
    with pytest.raises(SettingsError, match="STREAMFOLD_OPERATOR_TOKENS"):
        Settings.from_env({**env, "STREAMFOLD_API_TOKENS": f"ada:{GRACE.token}"})
