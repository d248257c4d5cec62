"""Low-latency read models in Faust tables, served by the worker's web views.

``GET /orders/{id}``, ``GET /accounts/{id}`` and ``GET /customers/{id}/orders`` answer
from tables kept by these agents, routed to the worker that owns the key. Postgres
holds the searchable read models; these are key lookups only.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import faust

from app.adapters.codec import Codec, DecodeError
from app.adapters.topics import TopicSpec, ensure_topics
from app.projections import views
from app.runtime import as_current
from app.settings import Settings

log = logging.getLogger("streamfold.views")
# Events a view agent takes at once; each key's view is written once per batch. A
# batch that does not fill waits at most BATCH_WAIT_S (Faust wakes an idle agent
# that often, so shorter costs CPU while idle).
BATCH = 500
BATCH_WAIT_S = 0.05


def register(app: faust.App, settings: Settings, codec: Codec) -> None:
    partitions = settings.partitions
    # Raw (bytes) keys: str keys are JSON in a table, and Faust's router would then
    # hash '"o-1"' for a lookup while the row sits in the partition of the event
    # keyed b"o-1" (murmur2), sending requests to a worker that does not own it.
    keyed = {"key_type": bytes, "partitions": partitions}
    orders = app.Table("order-views", **keyed)
    accounts = app.Table("account-views", **keyed)
    by_customer = app.Table("customer-orders", **keyed)
    raw = {"key_serializer": "raw", "value_serializer": "raw", "partitions": partitions}
    order_events = app.topic(settings.topics.events("orders"), **raw)
    account_events = app.topic(settings.topics.events("accounts"), **raw)
    # Order summaries re-keyed by customer: the repartition step behind
    # /customers/{id}/orders (Faust does not declare it on its own).
    summaries_name = f"{settings.app_id}-order-summaries-by-customer"
    ensure_topics(settings, [TopicSpec(summaries_name, partitions)])
    summaries = app.topic(
        summaries_name, key_type=str, value_serializer="json", partitions=partitions
    )

    def decoded(event: Any) -> tuple[dict[str, Any], dict[str, Any]] | None:
        try:
            data = dict(codec.decode(event.message.value).data)
        except DecodeError as error:  # the Postgres projections dead-letter these
            log.warning(
                "view skipped undecodable event at %s[%d]@%d: %s",
                event.message.topic,
                event.message.partition,
                event.message.offset,
                error.reason,
            )
            return None
        return data.pop("metadata"), data

    def latest(
        table: Any, changed: dict[bytes, tuple[Any, Any]], key: bytes, event: Any
    ) -> Any:
        """``key``'s view: as changed earlier in this batch, else as the table has it."""
        if key in changed:
            return changed[key][1]
        with as_current(event):
            return table.get(key)

    def fold_batch(
        events: list[Any], table: Any, fold: Callable[..., dict[str, Any] | None]
    ) -> dict[bytes, tuple[Any, dict[str, Any]]]:
        """Fold a batch's events into each key's view, in order; per changed key the
        last event it came with (its partition is the key's) and the new view. A
        key's view is written once per batch, not once per event."""
        changed: dict[bytes, tuple[Any, dict[str, Any]]] = {}
        for event in events:
            found = decoded(event)
            if found is None:
                continue
            key = found[0]["aggregate_id"].encode()
            view = fold(latest(table, changed, key, event), *found)
            if view is not None:
                changed[key] = (event, view)
        return changed

    def save(table: Any, changed: dict[bytes, tuple[Any, dict[str, Any]]]) -> None:
        for key, (event, view) in changed.items():
            with as_current(event):
                table[key] = view

    @app.agent(order_events, name="order-views")
    async def order_views(stream: faust.StreamT) -> None:
        async for events in stream.take_events(BATCH, within=BATCH_WAIT_S):
            changed = fold_batch(events, orders, views.fold_order)
            save(orders, changed)
            for _, summary in changed.values():
                await summaries.send(key=summary["customer_id"], value=summary)

    @app.agent(summaries, name="customer-orders")
    async def customer_orders(stream: faust.StreamT) -> None:
        async for events in stream.take_events(BATCH, within=BATCH_WAIT_S):
            changed: dict[bytes, tuple[Any, Any]] = {}
            for event in events:
                key = event.key.encode()
                current = latest(by_customer, changed, key, event)
                changed[key] = (event, views.upsert_order(current, event.value))
            save(by_customer, changed)

    @app.agent(account_events, name="account-views")
    async def account_views(stream: faust.StreamT) -> None:
        async for events in stream.take_events(BATCH, within=BATCH_WAIT_S):
            save(accounts, fold_batch(events, accounts, views.fold_account))

    @app.task
    async def warm_routing() -> None:
        # Faust's table router hashes keys with its producer's metadata, which knows only
        # topics the producer has written to; fetch the changelog topics' up front.
        producer = app.producer._ensure_producer()
        for table in (orders, accounts, by_customer):
            await producer.partitions_for(table.changelog_topic.get_topic_name())

    @app.page("/orders/{order_id}")
    @app.table_route(table=orders, match_info="order_id")
    async def get_order(web: Any, request: Any, order_id: str) -> Any:
        return _found(web, orders.get(order_id.encode()), f"order {order_id}")

    @app.page("/accounts/{account_id}")
    @app.table_route(table=accounts, match_info="account_id")
    async def get_account(web: Any, request: Any, account_id: str) -> Any:
        return _found(web, accounts.get(account_id.encode()), f"account {account_id}")

    @app.page("/customers/{customer_id}/orders")
    @app.table_route(table=by_customer, match_info="customer_id")
    async def get_customer_orders(web: Any, request: Any, customer_id: str) -> Any:
        try:
            page = views.page(
                by_customer.get(customer_id.encode()), dict(request.query)
            )
        except views.BadPage as error:
            return web.json({"error": error.message, "field": error.field}, status=400)
        return web.json({"customer_id": customer_id, **page})


def _found(web: Any, value: Any, what: str) -> Any:
    if value is None:
        return web.json({"error": f"{what} not found"}, status=404)
    return web.json(value)
