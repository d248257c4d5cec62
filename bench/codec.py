"""Codec: microseconds per event to encode and decode through Streamfold's codec
(Confluent framing, schema ids cached per subject and id, the upcast check), beside
fastavro's ``schemaless_writer``/``schemaless_reader`` on the same records with the
parsed schemas cached; and, for scale, the whole path an event takes in the product
(dataclass → record → bytes → record → dataclass).

Each variant makes ``repeats`` passes over the workload's events, the variants taking
turns; the figure is the fastest pass (the least disturbed by the rest of the
machine) divided by the events.
"""

from __future__ import annotations

from dataclasses import dataclass
from io import BytesIO
from typing import Any

from fastavro import schemaless_reader, schemaless_writer

from app.adapters import mapper
from app.settings import Settings
from bench.harness import (
    figure,
    interleaved,
    median,
    new_codec,
    order_events,
)


@dataclass(frozen=True, slots=True)
class Sizes:
    orders: int  # 4 events each
    repeats: int


def run(base: Settings, sizes: Sizes, seed: int, deployment: Any) -> dict[str, Any]:
    with deployment(base, "codec", kafka=False, database=False) as settings:
        codec = new_codec(settings)
        catalog = codec.catalog
        topic = settings.topics.events("orders")
        events = order_events(seed, sizes.orders)
        records = [
            (catalog.record_name(type(e)), mapper.event_record(e, meta), meta, e)
            for meta, e in events
        ]
        plain = [(catalog.parsed(name), record) for name, record, _, _ in records]

        def streamfold() -> None:
            for name, record, _, _ in records:
                codec.decode(codec.encode(topic, name, record))

        def fastavro() -> None:
            for schema, record in plain:
                out = BytesIO()
                schemaless_writer(out, schema, record)
                schemaless_reader(BytesIO(out.getvalue()), schema, None)

        def product_path() -> None:
            for name, _, meta, event in records:
                payload = codec.encode(topic, name, mapper.event_record(event, meta))
                decoded = codec.decode(payload)
                _, data = mapper.split_event(decoded.data)
                mapper.from_dict(catalog.class_for(decoded.record_name), data)

        # The decoded records must equal fastavro's, or the comparison means nothing.
        for (name, record, _, _), (schema, _) in zip(records, plain, strict=True):
            out = BytesIO()
            schemaless_writer(out, schema, record)
            ours = codec.decode(codec.encode(topic, name, record)).data
            theirs = schemaless_reader(BytesIO(out.getvalue()), schema, None)
            if ours != theirs:
                raise AssertionError(f"{name}: the codec and fastavro disagree")

        count = len(records)
        times = interleaved(
            {
                "streamfold": streamfold,
                "fastavro": fastavro,
                "product_path": product_path,
            },
            sizes.repeats,
        )
        results = {
            label: {
                "us_per_event": round(min(seconds) / count * 1e6, 2),
                "median_us_per_event": round((median(seconds) or 0.0) / count * 1e6, 2),
            }
            for label, seconds in times.items()
        }
        sizes_bytes = [len(codec.encode(topic, n, r)) for n, r, _, _ in records]
        return {
            "events": count,
            "mix": sorted({n.rsplit(".", 1)[1] for n, _, _, _ in records}),
            "mean_payload_bytes": round(sum(sizes_bytes) / count, 1),
            "repeats": sizes.repeats,
            **results,
        }


def figures(data: dict[str, Any]) -> list[dict[str, Any]]:
    measured = {
        "codec.encode_decode": (
            f"Codec encode+decode ({data['events']} order events)",
            "streamfold",
        ),
        "codec.product_path": (
            "Event dataclass → bytes → dataclass (mapper + codec)",
            "product_path",
        ),
    }
    return [
        figure(
            key,
            label,
            "µs/event",
            data[variant]["us_per_event"],
            data["fastavro"]["us_per_event"],
            "fastavro schemaless, schemas cached",
            better="lower",
            digits=2,
        )
        for key, (label, variant) in measured.items()
    ]
