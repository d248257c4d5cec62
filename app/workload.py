"""Commands built the same way wherever a workload drives Streamfold: the demo, the
soak, the benchmarks and the tests. A builder takes what identifies the command and
what the caller cares about, and fills in the rest the same way every time."""

from __future__ import annotations

import random
from collections.abc import Sequence

from app.domain.accounts import Deposit, OpenAccount, Withdraw
from app.domain.orders import Address, CreateOrder, LineItem, ProcessPayment

SPRINGFIELD = Address(
    street="1 Main St", city="Springfield", state="IL", zip_code="62701", country="US"
)
LONDON = Address(
    street="1 Analytical Way", city="London", state="", zip_code="N1", country="UK"
)


def deposit(
    account_id: str,
    amount_minor: int,
    transaction_id: str,
    *,
    currency: str = "USD",
    source: str = "card",
    reference: str = "",
) -> Deposit:
    return Deposit(
        account_id=account_id,
        transaction_id=transaction_id,
        amount_minor=amount_minor,
        currency=currency,
        source=source,
        reference=reference,
    )


def withdrawal(
    account_id: str,
    amount_minor: int,
    transaction_id: str,
    *,
    currency: str = "USD",
    destination: str = "bank",
    reference: str = "",
) -> Withdraw:
    return Withdraw(
        account_id=account_id,
        transaction_id=transaction_id,
        amount_minor=amount_minor,
        currency=currency,
        destination=destination,
        reference=reference,
    )


def new_order(
    order_id: str,
    customer_id: str,
    items: Sequence[LineItem],
    *,
    currency: str = "USD",
    name: str = "Ada Lovelace",
    email: str = "ada@example.com",
    address: Address = SPRINGFIELD,
    account_id: str | None = None,
) -> CreateOrder:
    """An order of ``items``, charged to ``account_id`` by the payment saga if one
    is given (otherwise paid by card, with ``payment``)."""
    return CreateOrder(
        order_id=order_id,
        customer_id=customer_id,
        customer_name=name,
        customer_email=email,
        items=tuple(items),
        currency=currency,
        shipping_address=address,
        account_id=account_id,
    )


def funded_account(
    account_id: str, funds_minor: int, *, currency: str = "EUR", owner_id: str = "c-1"
) -> tuple[OpenAccount | Deposit, ...]:
    """An account opened in ``currency`` and, unless ``funds_minor`` is 0, funded by
    a bank deposit: what an order charged to it needs."""
    opened = OpenAccount(account_id=account_id, owner_id=owner_id, currency=currency)
    if not funds_minor:
        return (opened,)
    funding = deposit(
        account_id,
        funds_minor,
        f"funding-{account_id}",
        currency=currency,
        source="bank",
        reference="funding",
    )
    return (opened, funding)


def charged_order(
    order_id: str, account_id: str | None, price_minor: int, *, currency: str = "EUR"
) -> CreateOrder:
    """An order of one item at ``price_minor``, charged to ``account_id`` by the
    payment saga (paid by card if ``account_id`` is None)."""
    item = LineItem(product_id="engine", quantity=1, unit_price_minor=price_minor)
    return new_order(
        order_id,
        "c-1",
        (item,),
        currency=currency,
        address=LONDON,
        account_id=account_id,
    )


def payment(
    order_id: str,
    amount_minor: int,
    payment_id: str,
    transaction_id: str,
    *,
    currency: str = "USD",
    method: str = "credit_card",
) -> ProcessPayment:
    return ProcessPayment(
        order_id=order_id,
        payment_id=payment_id,
        amount_minor=amount_minor,
        currency=currency,
        method=method,
        transaction_id=transaction_id,
    )


def ledger_traffic(
    rng: random.Random,
    accounts: Sequence[str],
    count: int,
    *,
    deposits: float,
    most: int,
    tag: str = "",
) -> list[Deposit | Withdraw]:
    """``count`` deposits (a share ``deposits`` of them) and withdrawals of 1 to
    ``most`` on accounts ``rng`` picks; a withdrawal may overdraw, and be refused.
    Transactions are numbered, ``tag`` before the number keeping runs apart."""
    out: list[Deposit | Withdraw] = []
    for n in range(count):
        account, amount = rng.choice(accounts), rng.randint(1, most)
        if rng.random() < deposits:
            out.append(deposit(account, amount, f"d{tag}{n}", reference=f"ref-{n}"))
        else:
            out.append(withdrawal(account, amount, f"w{tag}{n}"))
    return out
