"""The codec: Confluent framing, round trips of every record, errors, old writers."""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Sequence
from datetime import UTC, datetime
from io import BytesIO
from typing import Any

import httpx
import pytest
from confluent_kafka.schema_registry.error import SchemaRegistryError
from fastavro import parse_schema, schemaless_writer

from app.adapters import mapper
from app.adapters.catalog import SchemaCatalog, record_name, short_name
from app.adapters.codec import (
    Codec,
    ConfluentRegistry,
    DecodeError,
    EncodeError,
    InMemoryRegistry,
    NotFramed,
    Reference,
    Registered,
    RegistryError,
    RegistryUnavailable,
    SchemaNotFound,
    SchemaRejected,
    TooLarge,
    Undecodable,
    UnknownRecordType,
    UnknownSchemaId,
    _translate,
    headers,
    validate_size,
)
from app.domain import accounts, orders
from app.workload import deposit, new_order, payment, withdrawal
from tests.unit.deciders import recorded
from tests.unit.old_writers import ORDER_CREATED_V1, ORDER_CREATED_V2

ORDER_CREATED = "streamfold.orders.OrderCreated"
WHEN = datetime(2026, 3, 1, 12, 30, 15, 123000, tzinfo=UTC)

LINE = orders.OrderLine(
    product_id="sku-1",
    quantity=2,
    unit_price_minor=1250,
    tax_rate_bps=825,
    total_price_minor=2706,
)
ADDRESS = orders.Address(
    street="1 Main St", city="Springfield", state="IL", zip_code="62701", country="US"
)
ITEM = orders.LineItem(product_id="sku-2", quantity=1, unit_price_minor=999)

SAMPLE_EVENTS: list[Any] = [
    orders.OrderCreated(
        order_id="o-1",
        customer_id="c-1",
        customer_name="Ann Lee",
        customer_email="ann@example.com",
        items=(LINE, LINE),
        currency="USD",
        shipping_address=ADDRESS,
        total_minor=5412,
        account_id="a-1",
    ),
    orders.OrderItemAdded(order_id="o-1", item=LINE, total_minor=8118),
    orders.OrderItemRemoved(order_id="o-1", product_id="sku-1", total_minor=0),
    recorded(orders.PaymentProcessed, payment("o-1", 5412, "p-1", "t-1")),
    orders.OrderShipped(order_id="o-1", tracking_number="1Z", carrier="UPS"),
    orders.OrderDelivered(order_id="o-1"),
    orders.OrderCancelled(order_id="o-1", reason="changed mind", refund_due_minor=0),
    accounts.AccountOpened(
        account_id="a-1", owner_id="c-1", currency="EUR", overdraft_limit_minor=10_000
    ),
    recorded(
        accounts.MoneyDeposited,
        deposit("a-1", 2**40, "t-2", currency="EUR", source="wire"),
        balance_after_minor=2**40,
    ),
    recorded(
        accounts.MoneyWithdrawn,
        withdrawal(
            "a-1", 500, "t-3", currency="EUR", destination="atm", reference="cash"
        ),
        balance_after_minor=-500,
    ),
    accounts.AccountClosed(account_id="a-1", reason="moving"),
]

SAMPLE_COMMANDS: list[Any] = [
    new_order(
        "o-1",
        "c-1",
        (ITEM, orders.LineItem(product_id="sku-3", quantity=3, unit_price_minor=1)),
        name="Ann Lee",
        email="ann@example.com",
        address=ADDRESS,
    ),
    orders.AddItem(order_id="o-1", item=ITEM),
    orders.RemoveItem(order_id="o-1", product_id="sku-2"),
    payment("o-1", 999, "p-1", "t-1", method="account"),
    orders.ShipOrder(order_id="o-1", tracking_number="1Z", carrier="UPS"),
    orders.DeliverOrder(order_id="o-1"),
    orders.CancelOrder(order_id="o-1", reason="late"),
    accounts.OpenAccount(account_id="a-1", owner_id="c-1", currency="EUR"),
    deposit("a-1", 100, "t-1", currency="EUR"),
    withdrawal("a-1", 100, "t-2", currency="EUR", destination="atm", reference="r"),
    accounts.CloseAccount(account_id="a-1", reason="done"),
]


def metadata(event: Any, catalog: SchemaCatalog, **changes: Any) -> dict[str, Any]:
    name = record_name(type(event))
    return {
        "event_id": "e-1",
        "event_type": short_name(name),
        "event_version": catalog.latest_version(name),
        "aggregate_type": "order" if ".orders." in name else "account",
        "aggregate_id": "agg-1",
        "stream_version": 7,
        "timestamp": WHEN,
        "user_id": None,
        "correlation_id": "corr-1",
        "causation_id": "cmd-1",
        "command_id": "cmd-1",
        **changes,
    }


def envelope(**changes: Any) -> dict[str, Any]:
    return {
        "command_id": "cmd-1",
        "correlation_id": "corr-1",
        "causation_id": "cmd-1",
        "user_id": "user-9",
        "issued_at": WHEN,
        "expected_version": 3,
        **changes,
    }


@pytest.fixture(scope="module")
def catalog() -> SchemaCatalog:
    return SchemaCatalog.load()


@pytest.fixture
def registry() -> InMemoryRegistry:
    return InMemoryRegistry()


@pytest.fixture
def codec(registry: InMemoryRegistry, catalog: SchemaCatalog) -> Codec:
    return Codec(registry, catalog)


def frame(schema_id: int, body: bytes) -> bytes:
    return b"\x00" + schema_id.to_bytes(4, "big") + body


def avro_body(schema: Any, data: dict[str, Any]) -> bytes:
    out = BytesIO()
    schemaless_writer(out, schema, data)
    return out.getvalue()


def test_samples_cover_every_domain_command_and_event() -> None:
    assert {type(e) for e in SAMPLE_EVENTS} == {*orders.EVENTS, *accounts.EVENTS}
    assert {type(c) for c in SAMPLE_COMMANDS} == {*orders.COMMANDS, *accounts.COMMANDS}


@pytest.mark.parametrize("event", SAMPLE_EVENTS, ids=lambda e: type(e).__name__)
def test_every_event_round_trips(
    event: Any, codec: Codec, catalog: SchemaCatalog
) -> None:
    meta = metadata(event, catalog)
    name = record_name(type(event))
    payload = codec.encode("t.events", name, mapper.event_record(event, meta))

    decoded = codec.decode(payload)

    assert decoded.record_name == name
    assert decoded.short_name == type(event).__name__
    assert decoded.writer_version == catalog.latest_version(name)
    got_meta, got_payload = mapper.split_event(decoded.data)
    assert got_meta == meta
    assert mapper.from_dict(type(event), got_payload) == event


@pytest.mark.parametrize("command", SAMPLE_COMMANDS, ids=lambda c: type(c).__name__)
def test_every_command_round_trips(command: Any, codec: Codec) -> None:
    name = record_name(type(command))
    record = mapper.command_record(command, envelope())
    payload = codec.encode("t.commands", type(command).__name__, record)

    decoded = codec.decode(payload)

    assert decoded.record_name == name
    got_envelope, got_payload = mapper.split_command(decoded.data)
    assert got_envelope == envelope()
    assert mapper.from_dict(type(command), got_payload) == command


def test_command_result_round_trips_with_its_enum(codec: Codec) -> None:
    result = {
        "command_id": "cmd-1",
        "aggregate_type": "order",
        "aggregate_id": "o-1",
        "status": "REJECTED",
        "version": None,
        "event_ids": [],
        "partition": None,
        "offset": None,
        "code": "Validation",
        "message": "items[0].quantity must be between 1 and 10000, got 0",
        "field": "items[0].quantity",
        "correlation_id": "corr-1",
        "processed_at": WHEN,
    }
    decoded = codec.decode(codec.encode("command-results", "CommandResult", result))
    assert decoded.record_name == "streamfold.CommandResult"
    assert decoded.data == result


def test_frame_is_magic_byte_then_big_endian_schema_id(
    registry: InMemoryRegistry, catalog: SchemaCatalog
) -> None:
    # Start far from 0 so that byte order matters.
    registry = InMemoryRegistry(first_id=0x01020304)
    codec = Codec(registry, catalog)
    event = SAMPLE_EVENTS[5]
    payload = codec.encode(
        "t.events",
        "OrderDelivered",
        mapper.event_record(event, metadata(event, catalog)),
    )

    assert payload[0] == 0
    # The EventMetadata it refers to was registered first, as a reference.
    assert payload[1:5] == b"\x01\x02\x03\x05"
    assert registry.subjects == {
        "streamfold.EventMetadata": [0x01020304],
        "t.events-streamfold.orders.OrderDelivered": [0x01020305],
    }


def test_registers_once_per_subject_and_shares_ids_across_subjects(
    registry: InMemoryRegistry, codec: Codec, catalog: SchemaCatalog
) -> None:
    event = SAMPLE_EVENTS[5]
    record = mapper.event_record(event, metadata(event, catalog))
    calls: list[str] = []
    register = registry.register

    def counting(
        subject: str, schema: str, references: Sequence[Reference] = ()
    ) -> Registered:
        calls.append(subject)
        return register(subject, schema, references)

    registry.register = counting  # type: ignore[method-assign]
    first = codec.encode("a.events", "OrderDelivered", record)
    codec.encode("a.events", "OrderDelivered", record)
    other = codec.encode("b.events", "OrderDelivered", record)

    assert calls == [
        "streamfold.EventMetadata",
        "a.events-streamfold.orders.OrderDelivered",
        "b.events-streamfold.orders.OrderDelivered",
    ]
    assert first[:5] == other[:5]


def test_writer_schema_is_fetched_once_per_id(
    registry: InMemoryRegistry, codec: Codec, catalog: SchemaCatalog
) -> None:
    event = SAMPLE_EVENTS[4]
    payload = codec.encode(
        "t", "OrderShipped", mapper.event_record(event, metadata(event, catalog))
    )
    for _ in range(3):
        codec.decode(payload)
    assert registry.lookups == 1


# -- decode errors ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "words"),
    [
        (b"", "empty payload"),
        (b"\x00\x00\x01", "shorter than the 5-byte"),
        (b'{"order_id": "o-1"}', "magic byte is 0x7b"),
        (b"\x01\x00\x00\x00\x01\x02", "magic byte is 0x01"),
    ],
)
def test_unframed_payloads_are_refused(
    codec: Codec, payload: bytes, words: str
) -> None:
    with pytest.raises(NotFramed, match=words) as caught:
        codec.decode(payload)
    assert isinstance(caught.value, DecodeError)
    assert words in caught.value.reason


def test_unknown_schema_id(codec: Codec) -> None:
    with pytest.raises(UnknownSchemaId, match="schema id 999 is not in the registry"):
        codec.decode(frame(999, b"\x02"))


def test_body_that_does_not_decode_is_undecodable(
    codec: Codec, catalog: SchemaCatalog
) -> None:
    event = SAMPLE_EVENTS[0]
    good = codec.encode(
        "t", ORDER_CREATED, mapper.event_record(event, metadata(event, catalog))
    )

    with pytest.raises(
        Undecodable, match="OrderCreated body does not decode"
    ) as caught:
        codec.decode(good[:-7])
    assert "EOF" in caught.value.reason or "Error" in caught.value.reason

    with pytest.raises(Undecodable, match="3 bytes left over"):
        codec.decode(good + b"\x00\x00\x00")


def test_invalid_utf8_in_a_string_is_undecodable(codec: Codec) -> None:
    payload = codec.encode(
        "t", "RemoveItem", mapper.command_record(SAMPLE_COMMANDS[2], envelope())
    )
    # The command id is the first string after the header: break its first byte.
    broken = payload[:6] + b"\xff" + payload[7:]
    with pytest.raises(Undecodable, match="RemoveItem body does not decode"):
        codec.decode(broken)


def test_writer_of_an_unknown_record_type(
    registry: InMemoryRegistry, codec: Codec
) -> None:
    schema = {
        "type": "record",
        "name": "Invoice",
        "namespace": "com.example",
        "fields": [{"name": "id", "type": "string"}],
    }
    schema_id = registry.register("t-com.example.Invoice", json.dumps(schema)).schema_id
    payload = frame(schema_id, avro_body(parse_schema(schema), {"id": "x"}))

    with pytest.raises(UnknownRecordType, match=r"com\.example\.Invoice"):
        codec.decode(payload)
    # The verdict is cached: an id's schema never changes.
    with pytest.raises(UnknownRecordType):
        codec.decode(payload)
    assert registry.lookups == 1


def test_too_large() -> None:
    validate_size(b"x" * 10, 10)
    with pytest.raises(TooLarge, match="11 bytes exceeds the limit of 10") as caught:
        validate_size(b"x" * 11, 10)
    assert isinstance(caught.value, DecodeError)


# -- old and foreign writers ------------------------------------------------------------


def test_order_created_v1_decodes_as_latest_with_upcasters_applied(
    codec: Codec, catalog: SchemaCatalog
) -> None:
    v1 = {
        "metadata": metadata(SAMPLE_EVENTS[0], catalog, event_version=1),
        **ORDER_CREATED_V1,
    }
    payload = codec.encode("t", ORDER_CREATED, v1, version=1)

    decoded = codec.decode(payload)

    assert decoded.writer_version == 1
    assert catalog.latest_version(ORDER_CREATED) == 3
    _, payload_dict = mapper.split_event(decoded.data)
    event = mapper.from_dict(orders.OrderCreated, payload_dict)
    assert event == orders.OrderCreated(
        order_id="o-1",
        customer_id="c-1",
        customer_name="",
        customer_email="",
        # The lines v1 wrote, with what the upcasters add: no tax (v1 had none), totals.
        items=(
            orders.OrderLine(**v1["items"][0], tax_rate_bps=0, total_price_minor=750),
            orders.OrderLine(**v1["items"][1], tax_rate_bps=0, total_price_minor=1999),
        ),
        currency="USD",
        shipping_address=orders.Address(
            street="742 Evergreen Terrace",
            city="Springfield",
            state="OR",
            zip_code="97403",
            country="USA",
        ),
        total_minor=2749,
        account_id=None,
    )


def test_order_created_v2_decodes_as_latest_with_upcasters_applied(
    codec: Codec, catalog: SchemaCatalog
) -> None:
    v2 = {
        "metadata": metadata(SAMPLE_EVENTS[0], catalog, event_version=2),
        **ORDER_CREATED_V2,
    }
    decoded = codec.decode(codec.encode("t", ORDER_CREATED, v2, version=2))

    assert decoded.writer_version == 2
    data = decoded.data
    # Exactly what the upcasters make of it (test_upcasters checks their figures).
    assert data == catalog.upcast(ORDER_CREATED, 2, copy.deepcopy(v2))
    assert data["metadata"]["event_version"] == 2  # the fact as written
    mapper.from_dict(orders.OrderCreated, mapper.split_event(data)[1])


def test_order_created_v2_with_a_structured_address_keeps_it(
    codec: Codec, catalog: SchemaCatalog
) -> None:
    address = mapper.to_dict(ADDRESS)
    v2 = {
        "metadata": metadata(SAMPLE_EVENTS[0], catalog, event_version=2),
        "order_id": "o-2",
        "customer_id": "c-2",
        "items": [mapper.to_dict(LINE)],
        "total_minor": 2706,
        "shipping_address": address,
        "currency": "USD",
    }
    decoded = codec.decode(codec.encode("t", ORDER_CREATED, v2, version=2))
    assert decoded.data["shipping_address"] == address
    assert decoded.data["items"] == [mapper.to_dict(LINE)]


def test_external_compatible_writer_is_resolved_into_the_latest(
    registry: InMemoryRegistry, codec: Codec, catalog: SchemaCatalog
) -> None:
    # Another producer's variant: no account_id (the reader defaults it), an extra
    # field the reader ignores, and int where our schema has long.
    variant = json.loads(catalog.schema(ORDER_CREATED))
    variant["fields"] = [f for f in variant["fields"] if f["name"] != "account_id"]
    variant["fields"].append({"name": "channel", "type": "string"})
    for field in variant["fields"]:
        if field["name"] == "total_minor":
            field["type"] = "int"
    text = json.dumps(variant)
    assert catalog.identify(text) is None
    schema_id = registry.register(f"t-{ORDER_CREATED}", text).schema_id
    event = SAMPLE_EVENTS[0]
    record = {
        **mapper.event_record(event, metadata(event, catalog)),
        "channel": "web",
    }
    del record["account_id"]
    payload = frame(schema_id, avro_body(parse_schema(variant), record))

    decoded = codec.decode(payload)

    assert decoded.record_name == ORDER_CREATED
    assert decoded.writer_version is None
    assert "channel" not in decoded.data
    assert decoded.data["account_id"] is None
    assert decoded.data["total_minor"] == event.total_minor
    _, payload_dict = mapper.split_event(decoded.data)
    assert mapper.from_dict(orders.OrderCreated, payload_dict) == dataclasses.replace(
        event, account_id=None
    )


def test_external_writer_that_cannot_be_resolved_is_undecodable(
    registry: InMemoryRegistry, codec: Codec, catalog: SchemaCatalog
) -> None:
    variant = json.loads(catalog.schema("streamfold.orders.OrderShipped"))
    variant["fields"] = [f for f in variant["fields"] if f["name"] != "carrier"]
    schema_id = registry.register("t-x", json.dumps(variant)).schema_id
    event = SAMPLE_EVENTS[4]
    record = mapper.event_record(event, metadata(event, catalog))
    del record["carrier"]
    payload = frame(schema_id, avro_body(parse_schema(variant), record))

    with pytest.raises(Undecodable, match="OrderShipped body does not decode"):
        codec.decode(payload)


# -- encode errors ----------------------------------------------------------------------


def test_encode_unknown_record(codec: Codec) -> None:
    with pytest.raises(EncodeError, match="'Nope' is not in the catalog"):
        codec.encode("t", "Nope", {})


def test_encode_data_that_does_not_fit(codec: Codec, catalog: SchemaCatalog) -> None:
    event = SAMPLE_EVENTS[4]
    record = mapper.event_record(event, metadata(event, catalog))
    del record["carrier"]
    with pytest.raises(EncodeError, match="OrderShipped does not fit its schema"):
        codec.encode("t", "OrderShipped", record)
    with pytest.raises(EncodeError, match="OrderShipped"):
        codec.encode("t", "OrderShipped", {**record, "carrier": 5})


def test_encode_allows_leaving_out_fields_with_defaults(
    codec: Codec, catalog: SchemaCatalog
) -> None:
    meta = metadata(SAMPLE_EVENTS[5], catalog)
    del meta["user_id"]
    record = {"metadata": meta, "order_id": "o-1"}
    decoded = codec.decode(codec.encode("t", "OrderDelivered", record))
    assert decoded.data["metadata"]["user_id"] is None


# -- headers ----------------------------------------------------------------------------


def test_event_headers(catalog: SchemaCatalog) -> None:
    event = SAMPLE_EVENTS[0]
    meta = metadata(event, catalog)
    record = mapper.event_record(event, meta)
    expected = [
        ("event-type", b"OrderCreated"),
        ("event-version", b"3"),
        ("stream-version", b"7"),
        ("aggregate-id", b"agg-1"),
        ("correlation-id", b"corr-1"),
        ("event-id", b"e-1"),
        ("command-id", b"cmd-1"),
    ]
    assert headers(ORDER_CREATED, record) == expected
    assert (
        headers.for_event(
            event_type="OrderCreated",
            event_version=3,
            stream_version=7,
            aggregate_id="agg-1",
            correlation_id="corr-1",
            event_id="e-1",
            command_id="cmd-1",
        )
        == expected
    )


def test_command_headers() -> None:
    record = mapper.command_record(SAMPLE_COMMANDS[0], envelope())
    expected = [
        ("command-type", b"CreateOrder"),
        ("command-id", b"cmd-1"),
        ("correlation-id", b"corr-1"),
    ]
    assert headers("streamfold.orders.CreateOrder", record) == expected
    assert (
        headers.for_command(
            command_type="CreateOrder", command_id="cmd-1", correlation_id="corr-1"
        )
        == expected
    )
    assert headers("streamfold.CommandResult", {"command_id": "x"}) == []


# -- registries -------------------------------------------------------------------------


def test_in_memory_registry_enforces_its_compatibility_mode(
    catalog: SchemaCatalog,
) -> None:
    registry = InMemoryRegistry(compatibility="BACKWARD_TRANSITIVE")
    subject = f"t-{ORDER_CREATED}"
    registered = [
        registry.register(subject, catalog.schema(ORDER_CREATED, v)) for v in (1, 2, 3)
    ]
    assert registered == [Registered(v, v) for v in (1, 2, 3)]
    assert registry.register(subject, catalog.schema(ORDER_CREATED, 1)) == Registered(
        1, 1
    )
    breaking = json.loads(catalog.schema(ORDER_CREATED))
    breaking["fields"].append({"name": "loyalty_tier", "type": "string"})
    with pytest.raises(SchemaRejected, match="loyalty_tier"):
        registry.register(subject, json.dumps(breaking))
    with pytest.raises(SchemaRejected):
        registry.register(subject, "{not json")
    with pytest.raises(SchemaNotFound):
        registry.schema_by_id(42)


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (404, SchemaNotFound),
        (409, SchemaRejected),
        (422, SchemaRejected),
        (500, RegistryUnavailable),
        (503, RegistryUnavailable),
        (401, RegistryError),
    ],
)
def test_registry_client_errors_are_translated(
    status: int, error: type[RegistryError]
) -> None:
    translated = _translate(SchemaRegistryError(status, 1, "boom"), "asking")
    assert type(translated) is error
    assert "asking: boom" in str(translated)


def test_transport_errors_mean_unavailable() -> None:
    assert isinstance(
        _translate(httpx.ConnectError("refused"), "asking"), RegistryUnavailable
    )
    assert _translate(KeyError("x"), "asking") is None


def test_confluent_registry_that_is_not_there_is_unavailable() -> None:
    registry = ConfluentRegistry("http://127.0.0.1:9", {"max.retries": 0})
    with pytest.raises(RegistryUnavailable, match=r"127\.0\.0\.1:9"):
        registry.register("t-x", '"string"')
    with pytest.raises(RegistryUnavailable):
        registry.schema_by_id(1)
