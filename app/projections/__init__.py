"""Projections: read models folded from the event topics."""

from __future__ import annotations

from app.history import EventLogProjection
from app.projections.engine import Projection
from app.projections.ledger import LedgerProjection
from app.projections.orders import OrdersProjection

PROJECTIONS: dict[str, Projection] = {
    p.name: p for p in (OrdersProjection(), LedgerProjection(), EventLogProjection())
}
