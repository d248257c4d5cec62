"""Peer: the order workload of the end-to-end benchmark (create with 3 items, pay,
ship, deliver) through the Python ``eventsourcing`` library on the same Postgres (its
POSTGRES persistence module, a database of its own), beside Streamfold's figures for
the same commands in the same run.

``eventsourcing`` runs in this process with its defaults (no aggregate cache, no
snapshots): each command loads the order from Postgres, applies the method and saves
the new event, durable once its transaction commits. Streamfold's command is durable
once its events are acknowledged by Kafka (acks=all) and the result is sent.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib.metadata import version
from typing import Any
from uuid import NAMESPACE_URL, UUID, uuid5

from eventsourcing.application import Application
from eventsourcing.domain import Aggregate, event

from app.domain.orders import (
    CreateOrder,
    DeliverOrder,
    ProcessPayment,
    ShipOrder,
    line_total_minor,
)
from app.local import postgres
from app.settings import Settings
from bench.harness import (
    CpuSampler,
    figure,
    order_lifecycles,
    percentile,
    postgres_backends,
    tail_figures,
)


class OrderRefused(ValueError):
    pass


@dataclass
class Order(Aggregate, created_event_name="Created"):
    """The order aggregate in the eventsourcing library's idiom (its declarative,
    dataclass form), with the same rules the workload exercises in Streamfold's
    decider."""

    order_id: str
    customer_id: str
    customer_name: str
    customer_email: str
    items: list[dict[str, Any]]
    currency: str
    shipping_address: dict[str, str]
    total_minor: int
    status: str = field(default="CREATED", init=False)
    paid_minor: int = field(default=0, init=False)
    tracking_number: str | None = field(default=None, init=False)

    @classmethod
    def create_id(cls, order_id: str) -> UUID:
        return uuid5(NAMESPACE_URL, f"streamfold-bench/orders/{order_id}")

    def pay(
        self, payment_id: str, amount_minor: int, currency: str, method: str
    ) -> None:
        if self.status != "CREATED":
            raise OrderRefused(f"cannot pay for a {self.status} order")
        if currency != self.currency or amount_minor != self.total_minor:
            raise OrderRefused("payment does not match the order total")
        self._paid(payment_id=payment_id, amount_minor=amount_minor, method=method)

    @event("PaymentProcessed")
    def _paid(self, payment_id: str, amount_minor: int, method: str) -> None:
        self.status = "PAID"
        self.paid_minor = amount_minor

    def ship(self, tracking_number: str, carrier: str) -> None:
        if self.status != "PAID":
            raise OrderRefused(f"cannot ship a {self.status} order")
        self._shipped(tracking_number=tracking_number, carrier=carrier)

    @event("Shipped")
    def _shipped(self, tracking_number: str, carrier: str) -> None:
        self.status = "SHIPPED"
        self.tracking_number = tracking_number

    def deliver(self) -> None:
        if self.status != "SHIPPED":
            raise OrderRefused(f"cannot deliver a {self.status} order")
        self._delivered()

    @event("Delivered")
    def _delivered(self) -> None:
        self.status = "DELIVERED"


class Orders(Application[UUID]):
    """Command handlers: load, call, save — the library's application service."""

    def handle(self, command: Any) -> None:
        if isinstance(command, CreateOrder):
            lines: list[dict[str, Any]] = [
                {
                    "product_id": i.product_id,
                    "quantity": i.quantity,
                    "unit_price_minor": i.unit_price_minor,
                    "tax_rate_bps": i.tax_rate_bps,
                    "total_price_minor": line_total_minor(i),
                }
                for i in command.items
            ]
            address = command.shipping_address
            order = Order(
                order_id=command.order_id,
                customer_id=command.customer_id,
                customer_name=command.customer_name,
                customer_email=command.customer_email,
                items=lines,
                currency=command.currency,
                shipping_address={
                    "street": address.street,
                    "city": address.city,
                    "state": address.state,
                    "zip_code": address.zip_code,
                    "country": address.country,
                },
                total_minor=sum(line["total_price_minor"] for line in lines),
            )
            self.save(order)
            return
        order = self.repository.get(Order.create_id(command.order_id))
        match command:
            case ProcessPayment():
                order.pay(
                    command.payment_id,
                    command.amount_minor,
                    command.currency,
                    command.method,
                )
            case ShipOrder():
                order.ship(command.tracking_number, command.carrier)
            case DeliverOrder():
                order.deliver()
            case _:
                raise TypeError(f"not in the workload: {type(command).__name__}")
        self.save(order)


SEQUENTIAL_FIRST = 9_000_000


@dataclass(frozen=True, slots=True)
class Sizes:
    warmup_orders: int
    orders: int
    sequential_orders: int
    threads: int


def _environment(settings: Settings, threads: int) -> dict[str, str]:
    writer = postgres.Conninfo.parse(settings.database_url)
    return {
        "PERSISTENCE_MODULE": "eventsourcing.postgres",
        "POSTGRES_DBNAME": writer.database,
        "POSTGRES_HOST": writer.host,
        "POSTGRES_PORT": str(writer.port),
        "POSTGRES_USER": writer.user,
        "POSTGRES_PASSWORD": writer.password,
        "POSTGRES_POOL_SIZE": str(max(5, threads)),
    }


def _throughput(app: Orders, lifecycles: list[list[Any]], threads: int) -> float:
    def one_order(lifecycle: list[Any]) -> None:
        for command in lifecycle:
            app.handle(command)

    started = time.monotonic()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(one_order, lifecycles))
    return time.monotonic() - started


def run(base: Settings, sizes: Sizes, seed: int, deployment: Any) -> dict[str, Any]:
    """The backlog is the end-to-end benchmark's (same seed, same order numbers); the
    one-at-a-time latencies use orders numbered far from it."""
    with deployment(base, "peer", kafka=False) as settings:
        app = Orders(env=_environment(settings, sizes.threads))
        try:
            _throughput(app, order_lifecycles(seed, sizes.warmup_orders), sizes.threads)
            backlog = order_lifecycles(seed, sizes.orders, first=sizes.warmup_orders)
            commands = sum(len(lifecycle) for lifecycle in backlog)
            database = settings.database_url.rpartition("/")[2]
            sampler = CpuSampler(
                {
                    "process": lambda: [os.getpid()],
                    "postgres": postgres_backends(database),
                }
            )
            sampler.start()
            seconds = _throughput(app, backlog, sizes.threads)
            cpu = sampler.stop()
            latencies = []
            for lifecycle in order_lifecycles(
                seed, sizes.sequential_orders, first=SEQUENTIAL_FIRST
            ):
                for command in lifecycle:
                    began = time.perf_counter()
                    app.handle(command)
                    latencies.append((time.perf_counter() - began) * 1000)
            return {
                "library": f"eventsourcing {version('eventsourcing')} "
                "(eventsourcing.postgres, defaults)",
                "threads": sizes.threads,
                "commands": commands,
                "seconds": round(seconds, 3),
                "commands_per_s": round(commands / seconds, 1),
                "cpu_seconds": cpu,
                "sequential": {
                    "commands": len(latencies),
                    "p50_ms": _round(percentile(latencies, 0.50)),
                    "p99_ms": _round(percentile(latencies, 0.99)),
                    "mean_ms": _round(sum(latencies) / len(latencies)),
                },
            }
        finally:
            app.close()


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def figures(data: dict[str, Any], e2e: dict[str, Any]) -> list[dict[str, Any]]:
    ours = e2e["streamfold"]
    sequential = (ours["sequential"] or {}).get("direct", {})
    library = data["library"].split(" (")[0]
    return [
        figure(
            "peer.throughput",
            f"Order workload, durable commands/s ({data['commands']:,} commands)",
            "commands/s",
            ours["durable_commands_per_s"],
            data["commands_per_s"],
            f"{library}, {data['threads']} threads",
            better="higher",
            digits=1,
        ),
        *tail_figures(
            "peer.sequential_{p}",
            "Order workload, one command at a time: {p} until durable",
            sequential,
            data["sequential"],
            library,
            digits=2,
        ),
    ]
