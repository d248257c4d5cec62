"""Given / when / then for the order decider: every rule and every refusal."""

from __future__ import annotations

import pickle
from dataclasses import replace
from typing import Any

import pytest

from app import workload
from app.domain import orders
from app.domain.errors import DomainError, ErrorCode
from app.domain.orders import (
    AddItem,
    Address,
    CancelOrder,
    CreateOrder,
    DeliverOrder,
    LineItem,
    OrderCancelled,
    OrderCreated,
    OrderDelivered,
    OrderItemAdded,
    OrderItemRemoved,
    OrderLine,
    OrderShipped,
    OrderStatus,
    PaymentProcessed,
    ProcessPayment,
    RemoveItem,
    ShipOrder,
    line_total_minor,
)
from tests.unit.deciders import assert_primitive_record, given, recorded

ORDER_ID = "o-1"
ADDRESS = workload.SPRINGFIELD


def line_of(item: LineItem, total_price_minor: int) -> OrderLine:
    """``item`` as an order records it, with the total the test expects."""
    return OrderLine(
        product_id=item.product_id,
        quantity=item.quantity,
        unit_price_minor=item.unit_price_minor,
        tax_rate_bps=item.tax_rate_bps,
        total_price_minor=total_price_minor,
    )


# 2 x 500, no tax: 1000.
WIDGET = LineItem(product_id="p-1", quantity=2, unit_price_minor=500)
WIDGET_LINE = line_of(WIDGET, total_price_minor=1000)
# 1 x 1000 at 8%: 1080.
GADGET = LineItem(product_id="p-2", quantity=1, unit_price_minor=1000, tax_rate_bps=800)
GADGET_LINE = line_of(GADGET, total_price_minor=1080)


def create(**changes: Any) -> CreateOrder:
    order = workload.new_order(ORDER_ID, "c-1", (WIDGET, GADGET), address=ADDRESS)
    return replace(order, **changes)


def created(**changes: Any) -> OrderCreated:
    """``create()`` recorded: its items priced, and the total."""
    priced = {"items": (WIDGET_LINE, GADGET_LINE), "total_minor": 2080}
    return recorded(OrderCreated, create(), **(priced | changes))


def pay(**changes: Any) -> ProcessPayment:
    return replace(workload.payment(ORDER_ID, 2080, "pay-1", "tx-1"), **changes)


PAID = recorded(PaymentProcessed, pay())
SHIPPED = OrderShipped(order_id=ORDER_ID, tracking_number="1Z999", carrier="UPS")
DELIVERED = OrderDelivered(order_id=ORDER_ID)
CANCELLED = OrderCancelled(order_id=ORDER_ID, reason="changed mind", refund_due_minor=0)

HISTORY = {
    OrderStatus.CREATED: (created(),),
    OrderStatus.PAID: (created(), PAID),
    OrderStatus.SHIPPED: (created(), PAID, SHIPPED),
    OrderStatus.DELIVERED: (created(), PAID, SHIPPED, DELIVERED),
    OrderStatus.CANCELLED: (created(), CANCELLED),
}


def history(status: OrderStatus) -> tuple[Any, ...]:
    return HISTORY[status]


def all_but(*statuses: OrderStatus) -> list[OrderStatus]:
    return [s for s in HISTORY if s not in statuses]


# --- the module's shape -------------------------------------------------------


def test_module_names_its_aggregate_and_lists_its_classes() -> None:
    assert orders.AGGREGATE_TYPE == "order"
    assert len(orders.COMMANDS) == 7
    assert len(orders.EVENTS) == 7
    assert OrderCreated in orders.EVENTS
    assert CreateOrder in orders.COMMANDS


@pytest.mark.parametrize(
    "cls", [*orders.COMMANDS, *orders.EVENTS], ids=lambda c: c.__name__
)
def test_commands_and_events_are_frozen_records_of_primitives(cls: type) -> None:
    assert_primitive_record(cls)


def test_initial_state_does_not_exist() -> None:
    state = orders.initial_state()
    assert state.version == 0
    assert state.status is OrderStatus.NEW


def test_evolve_increments_version_by_one_per_event() -> None:
    events = (
        created(),
        OrderItemAdded(
            order_id=ORDER_ID,
            item=replace(WIDGET_LINE, product_id="p-3"),
            total_minor=3080,
        ),
        OrderItemRemoved(order_id=ORDER_ID, product_id="p-3", total_minor=2080),
        PAID,
        SHIPPED,
        DELIVERED,
    )
    state = orders.initial_state()
    for expected_version, event in enumerate(events, start=1):
        state = orders.evolve(state, event)
        assert state.version == expected_version
    assert state.status is OrderStatus.DELIVERED
    assert state.tracking_number == "1Z999"
    assert state.paid_minor == 2080


def test_decide_is_deterministic_across_fresh_states() -> None:
    first = orders.decide(given(orders).state(), create())
    second = orders.decide(given(orders).state(), create())
    assert first == second


# --- line totals --------------------------------------------------------------


@pytest.mark.parametrize(
    ("quantity", "unit_price", "tax_bps", "total"),
    [
        (1, 100, 0, 100),
        (3, 333, 0, 999),
        (1, 100, 825, 108),  # 8.25 rounds down
        (1, 10, 1250, 11),  # 1.25 rounds down
        (1, 2, 2500, 3),  # 0.5 rounds up
        (1, 6, 2500, 8),  # 1.5 rounds up
        (1, 1, 4999, 1),  # 0.4999 rounds down
        (1, 1, 5000, 2),  # 0.5 rounds up
        (3, 333, 1000, 1099),  # 99.9 rounds up
        (1, 100, 10_000, 200),
        (10_000, 10**12, 10_000, 2 * 10**16),  # the largest line: exact, no float
        (5, 0, 2000, 0),
    ],
)
def test_line_total_rounds_tax_half_up(
    quantity: int, unit_price: int, tax_bps: int, total: int
) -> None:
    item = LineItem(
        product_id="p",
        quantity=quantity,
        unit_price_minor=unit_price,
        tax_rate_bps=tax_bps,
    )
    assert line_total_minor(item) == total


# --- CreateOrder --------------------------------------------------------------


def test_create_records_priced_lines_and_total() -> None:
    state = given(orders).when(create()).then(created())
    assert state.status is OrderStatus.CREATED
    assert state.version == 1
    assert state.total_minor == 2080
    assert state.items == (WIDGET_LINE, GADGET_LINE)


def test_create_keeps_the_account_id() -> None:
    given(orders).when(create(account_id="a-1")).then(created(account_id="a-1"))


def test_create_strips_free_text() -> None:
    padded = Address(
        street=" 1 Main St ",
        city=" Springfield",
        state=" ",
        zip_code="62701 ",
        country=" US",
    )
    given(orders).when(
        create(
            customer_name="  Ada Lovelace ",
            customer_email=" ada@example.com ",
            shipping_address=padded,
        )
    ).then(created(shipping_address=replace(ADDRESS, state="")))


def test_create_allows_an_empty_address_state() -> None:
    address = replace(ADDRESS, state="")
    given(orders).when(create(shipping_address=address)).then(
        created(shipping_address=address)
    )


def test_create_computes_the_total_and_ignores_client_totals() -> None:
    # A client that sends priced lines does not get to set the price.
    bogus = replace(WIDGET_LINE, total_price_minor=1)
    given(orders).when(create(items=(bogus,))).then(
        created(items=(WIDGET_LINE,), total_minor=1000)
    )


def test_create_accepts_boundary_values() -> None:
    items = (
        LineItem(product_id="min", quantity=1, unit_price_minor=0, tax_rate_bps=0),
        LineItem(
            product_id="max",
            quantity=10_000,
            unit_price_minor=10**12,
            tax_rate_bps=10_000,
        ),
    )
    (event,) = orders.decide(orders.initial_state(), create(items=items))
    assert isinstance(event, OrderCreated)
    assert event.total_minor == 2 * 10**16
    assert [line.total_price_minor for line in event.items] == [0, 2 * 10**16]


@pytest.mark.parametrize("status", list(HISTORY))
def test_create_refuses_an_existing_order(status: OrderStatus) -> None:
    given(orders, *history(status)).when(create()).rejects(ErrorCode.ALREADY_EXISTS)


def _item(**changes: Any) -> LineItem:
    return replace(GADGET, **changes)


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"order_id": ""}, "order_id"),
        ({"order_id": "   "}, "order_id"),
        ({"order_id": " o-1"}, "order_id"),
        ({"customer_id": ""}, "customer_id"),
        ({"customer_name": " \t"}, "customer_name"),
        ({"customer_email": ""}, "customer_email"),
        ({"customer_email": "ada.example.com"}, "customer_email"),
        ({"customer_email": "@example.com"}, "customer_email"),
        ({"customer_email": "ada@"}, "customer_email"),
        ({"customer_email": "ada@ex@ample.com"}, "customer_email"),
        ({"items": ()}, "items"),
        ({"items": (WIDGET, _item(product_id=""))}, "items[1].product_id"),
        ({"items": (WIDGET, _item(quantity=0))}, "items[1].quantity"),
        ({"items": (WIDGET, _item(quantity=10_001))}, "items[1].quantity"),
        ({"items": (_item(quantity=True),)}, "items[0].quantity"),
        ({"items": (WIDGET, _item(unit_price_minor=-1))}, "items[1].unit_price_minor"),
        (
            {"items": (WIDGET, _item(unit_price_minor=10**12 + 1))},
            "items[1].unit_price_minor",
        ),
        ({"items": (WIDGET, _item(tax_rate_bps=-1))}, "items[1].tax_rate_bps"),
        ({"items": (WIDGET, _item(tax_rate_bps=10_001))}, "items[1].tax_rate_bps"),
        ({"items": (WIDGET, GADGET, _item(quantity=5))}, "items[2].product_id"),
        ({"currency": ""}, "currency"),
        ({"currency": "usd"}, "currency"),
        ({"currency": "US"}, "currency"),
        ({"currency": "USDT"}, "currency"),
        ({"currency": "XYZ"}, "currency"),
        ({"currency": "U5D"}, "currency"),
        ({"currency": "ÜSD"}, "currency"),
        ({"shipping_address": replace(ADDRESS, street="")}, "shipping_address.street"),
        ({"shipping_address": replace(ADDRESS, city=" ")}, "shipping_address.city"),
        (
            {"shipping_address": replace(ADDRESS, zip_code="")},
            "shipping_address.zip_code",
        ),
        (
            {"shipping_address": replace(ADDRESS, country="")},
            "shipping_address.country",
        ),
        ({"account_id": ""}, "account_id"),
    ],
)
def test_create_rejects_invalid_fields(changes: dict[str, Any], field: str) -> None:
    error = given(orders).when(create(**changes)).rejects(ErrorCode.VALIDATION, field)
    assert field in error.message


@pytest.mark.parametrize(
    "command",
    [
        AddItem(order_id=ORDER_ID, item=WIDGET),
        RemoveItem(order_id=ORDER_ID, product_id="p-1"),
        pay(),
        ShipOrder(order_id=ORDER_ID, tracking_number="1Z", carrier="UPS"),
        DeliverOrder(order_id=ORDER_ID),
        CancelOrder(order_id=ORDER_ID, reason="oops"),
    ],
    ids=lambda c: type(c).__name__,
)
def test_commands_on_a_missing_order_are_not_found(command: Any) -> None:
    error = given(orders).when(command).rejects(ErrorCode.NOT_FOUND)
    assert ORDER_ID in error.message


def test_a_command_for_another_order_is_refused() -> None:
    given(orders, created()).when(DeliverOrder(order_id="o-2")).rejects(
        ErrorCode.VALIDATION, "order_id"
    )


# --- AddItem / RemoveItem -----------------------------------------------------

EXTRA = LineItem(product_id="p-3", quantity=3, unit_price_minor=333, tax_rate_bps=1000)
EXTRA_LINE = line_of(EXTRA, total_price_minor=1099)


def test_add_item_records_the_line_and_the_new_total() -> None:
    state = (
        given(orders, created())
        .when(AddItem(order_id=ORDER_ID, item=EXTRA))
        .then(OrderItemAdded(order_id=ORDER_ID, item=EXTRA_LINE, total_minor=3179))
    )
    assert state.items == (WIDGET_LINE, GADGET_LINE, EXTRA_LINE)
    assert state.total_minor == 3179


def test_add_item_prices_the_line_itself() -> None:
    bogus = replace(EXTRA_LINE, total_price_minor=999_999)
    given(orders, created()).when(AddItem(order_id=ORDER_ID, item=bogus)).then(
        OrderItemAdded(order_id=ORDER_ID, item=EXTRA_LINE, total_minor=3179)
    )


def test_add_item_refuses_a_product_already_in_the_order() -> None:
    given(orders, created()).when(AddItem(order_id=ORDER_ID, item=WIDGET)).rejects(
        ErrorCode.VALIDATION, "item.product_id"
    )


@pytest.mark.parametrize(
    ("item", "field"),
    [
        (replace(EXTRA, product_id=" "), "item.product_id"),
        (replace(EXTRA, quantity=0), "item.quantity"),
        (replace(EXTRA, unit_price_minor=-5), "item.unit_price_minor"),
        (replace(EXTRA, tax_rate_bps=10_001), "item.tax_rate_bps"),
    ],
)
def test_add_item_validates_the_line(item: LineItem, field: str) -> None:
    given(orders, created()).when(AddItem(order_id=ORDER_ID, item=item)).rejects(
        ErrorCode.VALIDATION, field
    )


@pytest.mark.parametrize("status", all_but(OrderStatus.CREATED))
def test_add_item_only_while_created(status: OrderStatus) -> None:
    error = (
        given(orders, *history(status))
        .when(AddItem(order_id=ORDER_ID, item=EXTRA))
        .rejects(ErrorCode.INVALID_STATE)
    )
    assert status.value in error.message


def test_remove_item_records_the_new_total() -> None:
    state = (
        given(orders, created())
        .when(RemoveItem(order_id=ORDER_ID, product_id="p-1"))
        .then(OrderItemRemoved(order_id=ORDER_ID, product_id="p-1", total_minor=1080))
    )
    assert state.items == (GADGET_LINE,)
    assert state.total_minor == 1080


def test_remove_then_add_the_same_product_is_allowed() -> None:
    removed = OrderItemRemoved(order_id=ORDER_ID, product_id="p-1", total_minor=1080)
    given(orders, created(), removed).when(
        AddItem(order_id=ORDER_ID, item=WIDGET)
    ).then(OrderItemAdded(order_id=ORDER_ID, item=WIDGET_LINE, total_minor=2080))


@pytest.mark.parametrize("product_id", ["p-9", ""])
def test_remove_item_refuses_an_unknown_product(product_id: str) -> None:
    given(orders, created()).when(
        RemoveItem(order_id=ORDER_ID, product_id=product_id)
    ).rejects(ErrorCode.VALIDATION, "product_id")


def test_remove_item_keeps_at_least_one_item() -> None:
    error = (
        given(orders, created(items=(WIDGET_LINE,), total_minor=1000))
        .when(RemoveItem(order_id=ORDER_ID, product_id="p-1"))
        .rejects(ErrorCode.INVALID_STATE)
    )
    assert error.message == "an order keeps at least one item; cancel it instead"


@pytest.mark.parametrize("status", all_but(OrderStatus.CREATED))
def test_remove_item_only_while_created(status: OrderStatus) -> None:
    error = (
        given(orders, *history(status))
        .when(RemoveItem(order_id=ORDER_ID, product_id="p-1"))
        .rejects(ErrorCode.INVALID_STATE)
    )
    assert status.value in error.message


# --- ProcessPayment -----------------------------------------------------------


def test_payment_of_the_total_pays_the_order() -> None:
    state = given(orders, created()).when(pay()).then(PAID)
    assert state.status is OrderStatus.PAID
    assert state.paid_minor == 2080


@pytest.mark.parametrize("method", ["credit_card", "paypal", "bank_transfer"])
def test_an_order_without_an_account_takes_every_other_method(method: str) -> None:
    given(orders, created()).when(pay(method=method)).then(replace(PAID, method=method))


def test_payment_must_match_the_total_after_item_changes() -> None:
    added = OrderItemAdded(order_id=ORDER_ID, item=EXTRA_LINE, total_minor=3179)
    given(orders, created(), added).when(pay(amount_minor=2080)).rejects(
        ErrorCode.PAYMENT_MISMATCH
    )
    given(orders, created(), added).when(pay(amount_minor=3179)).then(
        replace(PAID, amount_minor=3179)
    )


@pytest.mark.parametrize("amount", [2079, 2081, 0])
def test_payment_of_another_amount_is_a_mismatch(amount: int) -> None:
    error = (
        given(orders, created())
        .when(pay(amount_minor=amount))
        .rejects(ErrorCode.PAYMENT_MISMATCH)
    )
    shown = {2079: "20.79", 2081: "20.81", 0: "0.00"}[amount]
    assert error.message == (
        f"payment {shown} USD does not match order total 20.80 USD"
    )


def test_payment_in_another_currency_is_a_currency_mismatch() -> None:
    error = (
        given(orders, created())
        .when(pay(currency="EUR"))
        .rejects(ErrorCode.CURRENCY_MISMATCH)
    )
    assert "EUR" in error.message
    assert "USD" in error.message


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"payment_id": ""}, "payment_id"),
        ({"transaction_id": " "}, "transaction_id"),
        ({"method": "cash"}, "method"),
        ({"method": ""}, "method"),
        ({"method": "account"}, "method"),  # the order has no account_id
        ({"currency": "usd"}, "currency"),
        ({"amount_minor": -2080}, "amount_minor"),
        ({"amount_minor": True}, "amount_minor"),
    ],
)
def test_payment_rejects_invalid_fields(changes: dict[str, Any], field: str) -> None:
    given(orders, created()).when(pay(**changes)).rejects(ErrorCode.VALIDATION, field)


@pytest.mark.parametrize("status", all_but(OrderStatus.CREATED))
def test_payment_only_while_created(status: OrderStatus) -> None:
    error = given(orders, *history(status)).when(pay()).rejects(ErrorCode.INVALID_STATE)
    assert status.value in error.message


# --- an order created with an account: the payment saga pays it ----------------

ACCOUNT_ORDER = created(account_id="a-1")
SAGA_PAYMENT = pay(method="account", transaction_id="order-payment:o-1")


def _names_the_order_the_account_and_the_saga(error: DomainError) -> None:
    assert "order o-1" in error.message
    assert "account a-1" in error.message
    assert "payment saga" in error.message


def test_the_sagas_payment_pays_an_order_created_with_an_account() -> None:
    assert orders.account_payment_transaction(ORDER_ID) == "order-payment:o-1"
    given(orders, ACCOUNT_ORDER).when(SAGA_PAYMENT).then(
        recorded(PaymentProcessed, SAGA_PAYMENT)
    )


@pytest.mark.parametrize(
    "payment",
    [
        pay(method="credit_card"),
        pay(method="paypal"),
        pay(method="bank_transfer"),
        pay(method="account", transaction_id="tx-1"),  # not the saga's transaction
    ],
    ids=["credit_card", "paypal", "bank_transfer", "account-not-the-sagas"],
)
def test_an_order_created_with_an_account_takes_no_other_payment(
    payment: ProcessPayment,
) -> None:
    error = given(orders, ACCOUNT_ORDER).when(payment).rejects(ErrorCode.INVALID_STATE)
    _names_the_order_the_account_and_the_saga(error)


@pytest.mark.parametrize(
    "command",
    [
        AddItem(order_id=ORDER_ID, item=EXTRA),
        RemoveItem(order_id=ORDER_ID, product_id="p-1"),
    ],
    ids=["AddItem", "RemoveItem"],
)
def test_an_order_created_with_an_account_keeps_its_items(command: Any) -> None:
    """The saga charges the total the order was created with."""
    error = given(orders, ACCOUNT_ORDER).when(command).rejects(ErrorCode.INVALID_STATE)
    _names_the_order_the_account_and_the_saga(error)


@pytest.mark.parametrize("paid", [False, True])
def test_an_order_created_with_an_account_can_be_cancelled(paid: bool) -> None:
    """Its owner may cancel it, paid or not: the saga refunds what it took."""
    paid_events = (recorded(PaymentProcessed, SAGA_PAYMENT),) if paid else ()
    given(orders, ACCOUNT_ORDER, *paid_events).when(
        CancelOrder(order_id=ORDER_ID, reason="changed mind")
    ).then(replace(CANCELLED, refund_due_minor=2080 if paid else 0))


# --- ShipOrder / DeliverOrder -------------------------------------------------


def test_ship_a_paid_order() -> None:
    state = (
        given(orders, created(), PAID)
        .when(ShipOrder(order_id=ORDER_ID, tracking_number=" 1Z999 ", carrier="UPS"))
        .then(SHIPPED)
    )
    assert state.status is OrderStatus.SHIPPED
    assert state.tracking_number == "1Z999"


@pytest.mark.parametrize("status", all_but(OrderStatus.PAID))
def test_ship_only_when_paid(status: OrderStatus) -> None:
    error = (
        given(orders, *history(status))
        .when(ShipOrder(order_id=ORDER_ID, tracking_number="1Z", carrier="UPS"))
        .rejects(ErrorCode.INVALID_STATE)
    )
    assert status.value in error.message


@pytest.mark.parametrize(
    ("tracking", "carrier", "field"),
    [("", "UPS", "tracking_number"), ("1Z", " ", "carrier")],
)
def test_ship_needs_tracking_and_carrier(
    tracking: str, carrier: str, field: str
) -> None:
    given(orders, created(), PAID).when(
        ShipOrder(order_id=ORDER_ID, tracking_number=tracking, carrier=carrier)
    ).rejects(ErrorCode.VALIDATION, field)


def test_deliver_a_shipped_order() -> None:
    state = (
        given(orders, created(), PAID, SHIPPED)
        .when(DeliverOrder(order_id=ORDER_ID))
        .then(DELIVERED)
    )
    assert state.status is OrderStatus.DELIVERED


@pytest.mark.parametrize("status", all_but(OrderStatus.SHIPPED))
def test_deliver_only_when_shipped(status: OrderStatus) -> None:
    given(orders, *history(status)).when(DeliverOrder(order_id=ORDER_ID)).rejects(
        ErrorCode.INVALID_STATE
    )


# --- CancelOrder --------------------------------------------------------------


def test_cancel_before_payment_refunds_nothing() -> None:
    state = (
        given(orders, created())
        .when(CancelOrder(order_id=ORDER_ID, reason=" changed mind "))
        .then(CANCELLED)
    )
    assert state.status is OrderStatus.CANCELLED


def test_cancel_after_payment_refunds_what_was_paid() -> None:
    given(orders, created(), PAID).when(
        CancelOrder(order_id=ORDER_ID, reason="changed mind")
    ).then(replace(CANCELLED, refund_due_minor=2080))


@pytest.mark.parametrize(
    "status", [OrderStatus.SHIPPED, OrderStatus.DELIVERED, OrderStatus.CANCELLED]
)
def test_cancel_only_before_shipping(status: OrderStatus) -> None:
    error = (
        given(orders, *history(status))
        .when(CancelOrder(order_id=ORDER_ID, reason="too late"))
        .rejects(ErrorCode.INVALID_STATE)
    )
    assert error.message == f"cannot cancel a {status.value} order"


def test_cancel_needs_a_reason() -> None:
    given(orders, created()).when(CancelOrder(order_id=ORDER_ID, reason="  ")).rejects(
        ErrorCode.VALIDATION, "reason"
    )


# --- DomainError ----------------------------------------------------------------


def test_domain_error_carries_plain_values_and_survives_pickling() -> None:
    error = DomainError(ErrorCode.VALIDATION, "items must not be empty", "items")
    assert type(error.code) is str
    assert error.code == "Validation"
    assert str(error) == "items must not be empty"
    copy = pickle.loads(pickle.dumps(error))  # noqa: S301 - our own bytes
    assert (copy.code, copy.message, copy.field) == (
        "Validation",
        error.message,
        "items",
    )
