"""Low-latency read models in Faust tables, served by the worker's web views.

``GET /orders/{id}``, ``GET /accounts/{id}`` and ``GET /customers/{id}/orders`` answer
from tables kept by these agents, routed to the worker that owns the key. Postgres
holds the searchable read models; these are key lookups only.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import faust
from yarl import URL

from app import params as checked
from app.adapters import topics
from app.adapters.codec import Codec, DecodeError
from app.adapters.eventlog import partition_for
from app.adapters.topics import TopicSpec, ensure_topics
from app.projections import views
from app.settings import Settings

log = logging.getLogger("streamfold.views")


def register(app: faust.App, settings: Settings, codec: Codec) -> None:
    partitions = settings.partitions
    # Raw (bytes) keys: str keys are JSON in a table, and Faust's router would then
    # hash '"o-1"' for a lookup while the row sits in the partition of the event
    # keyed b"o-1" (murmur2), sending requests to a worker that does not own it.
    orders = app.Table("order-views", key_type=bytes, partitions=partitions)
    accounts = app.Table("account-views", key_type=bytes, partitions=partitions)
    by_customer = app.Table("customer-orders", key_type=bytes, partitions=partitions)
    order_events = raw_topic(app, settings.topics.events("orders"), partitions)
    account_events = raw_topic(app, settings.topics.events("accounts"), partitions)
    # Order summaries re-keyed by customer: the repartition step behind
    # /customers/{id}/orders (Faust does not declare it on its own).
    summaries_name = f"{settings.app_id}-order-summaries-by-customer"
    ensure_topics(settings, [TopicSpec(summaries_name, partitions)])
    summaries = app.topic(
        summaries_name, key_type=str, value_serializer="json", partitions=partitions
    )

    def decoded(
        value: bytes, where: tuple[str, int, int]
    ) -> tuple[dict[str, Any], dict[str, Any]] | None:
        try:
            data = dict(codec.decode(value).data)
        except DecodeError as error:  # the Postgres projections dead-letter these
            log.warning(
                "view skipped undecodable event at %s[%d]@%d: %s", *where, error.reason
            )
            return None
        return data.pop("metadata"), data

    async def fold(table: Any, fold_view: Fold, event: Any) -> Any:
        """Fold one event into its key's view in ``table``; the new view, or None.

        Faust's consumer reads uncommitted records, so a view may take an event of a
        transaction that then aborts; a view that shows it (see
        ``views.needs_healing``) is folded again from the committed log."""
        message = event.message
        where = (message.topic, message.partition, message.offset)
        found = decoded(message.value, where)
        if found is None:
            return None
        meta, data = found
        key = meta["aggregate_id"].encode()
        current = table.get(key)
        view = fold_view(current, meta, data)
        if views.needs_healing(current, meta, view):
            view = await healed(fold_view, key, where)
            if view is None:
                table.pop(key, None)
        if view is not None:
            table[key] = view
        return view

    async def healed(fold_view: Fold, key: bytes, where: tuple[str, int, int]) -> Any:
        topic, partition, offset = where
        values = await committed_values(settings, where, key)
        view = views.refold(
            fold_view,
            (f for f in (decoded(v, where) for v in values) if f is not None),
        )
        log.warning(
            "view of %s rebuilt from %d committed events of %s[%d] up to %d: "
            "version %s",
            key.decode(errors="replace"),
            len(values),
            topic,
            partition,
            offset,
            None if view is None else view["version"],
        )
        return view

    # One event at a time: Faust then names the partition a table write goes to
    # (the event's), which its public API offers no other way to do.
    @app.agent(order_events, name="order-views")
    async def order_views(stream: faust.StreamT[bytes]) -> None:
        async for event in stream.events():
            view = await fold(orders, views.fold_order, event)
            if view is not None:
                await summaries.send(key=view["customer_id"], value=view)

    @app.agent(summaries, name="customer-orders")
    async def customer_orders(stream: faust.StreamT[dict[str, Any]]) -> None:
        async for event in stream.events():
            key = event.key.encode()
            by_customer[key] = views.upsert_order(by_customer.get(key), event.value)

    @app.agent(account_events, name="account-views")
    async def account_views(stream: faust.StreamT[bytes]) -> None:
        async for event in stream.events():
            await fold(accounts, views.fold_account, event)

    @app.page("/orders/{order_id}")
    @routed(app, orders, "order_id")
    async def get_order(web: Any, request: Any, order_id: str) -> Any:
        return _found(web, orders.get(order_id.encode()), f"order {order_id}")

    @app.page("/accounts/{account_id}")
    @routed(app, accounts, "account_id")
    async def get_account(web: Any, request: Any, account_id: str) -> Any:
        return _found(web, accounts.get(account_id.encode()), f"account {account_id}")

    @app.page("/customers/{customer_id}/orders")
    @routed(app, by_customer, "customer_id", takes=("page", "page_size"))
    async def get_customer_orders(web: Any, request: Any, customer_id: str) -> Any:
        held = by_customer.get(customer_id.encode())
        if held is None:
            return _found(web, None, f"customer {customer_id}")
        page = views.page(held, dict(request.query))
        return web.json({"customer_id": customer_id, **page})


async def committed_values(
    settings: Settings, where: tuple[str, int, int], key: bytes
) -> list[bytes]:
    """The values of ``key``'s committed records up to ``where`` (topic, partition,
    offset) included, off the event loop: what a view read uncommitted heals from
    (Faust's consumer reads records of transactions that then abort)."""
    topic, partition, offset = where
    return await asyncio.get_running_loop().run_in_executor(
        None, topics.records_of_key, settings, topic, partition, key, offset + 1
    )


def raw_topic(app: faust.App, name: str, partitions: int) -> faust.TopicT:
    """Topic ``name`` read with bytes keys and values (no Faust serializer)."""
    return app.topic(
        name, key_serializer="raw", value_serializer="raw", partitions=partitions
    )


View = Callable[..., Awaitable[Any]]
Fold = Callable[[Any, dict[str, Any], dict[str, Any]], Any]


def routed(
    app: faust.App, table: Any, match_info: str, takes: tuple[str, ...] = ()
) -> Callable[[View], View]:
    """Serve a key's view on the worker that owns the key's partition of ``table``,
    forwarding the request there from any other (what Faust's ``table_route`` does,
    through its public API only: the key's partition is its murmur2 hash, as the
    events that fill the table are partitioned). The key and the query parameters
    (``takes`` names them) are checked first: a bad one is a 400 naming it, here or
    from the view."""

    def decorate(view: View) -> View:
        @functools.wraps(view)
        async def serve(web: Any, request: Any, **kwargs: Any) -> Any:
            try:
                checked.accepted(request.query.items(), takes)
                checked.identifier(str(kwargs[match_info]), match_info)
                return await owner_serves(web, request, **kwargs)
            except checked.BadParameter as error:
                return web.json(
                    {"error": error.message, "field": error.field}, status=400
                )

        async def owner_serves(web: Any, request: Any, **kwargs: Any) -> Any:
            key = str(kwargs[match_info]).encode()
            topic = table.changelog_topic.get_topic_name()
            partition = partition_for(key, table.partitions)
            owners = [
                url
                for url, topics in app.router.table_metadata(table.name).items()
                if partition in topics.get(topic, ())
            ]
            if not owners:
                return web.json(
                    {"error": "no worker owns this key right now; try again"},
                    status=503,
                )
            owner = URL(owners[0])
            here = URL(str(app.conf.canonical_url))
            if (owner.host, owner.port) == (here.host, here.port):
                return await view(web, request, **kwargs)
            async with app.http_client.get(
                str(owner.with_path(request.path).with_query(request.query_string))
            ) as response:
                return web.text(
                    await response.text(),
                    content_type=response.content_type,
                    status=response.status,
                )

        return serve

    return decorate


def _found(web: Any, value: Any, what: str) -> Any:
    if value is None:
        return web.json({"error": f"{what} not found"}, status=404)
    return web.json(value)
