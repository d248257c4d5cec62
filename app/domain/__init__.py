"""The pure domain: one decider per aggregate type, standard library only.

Nothing here knows about Kafka, Avro or Postgres; time and ids arrive with commands.
"""

from __future__ import annotations

from app.domain.errors import DomainError, ErrorCode

__all__ = ["DomainError", "ErrorCode"]
