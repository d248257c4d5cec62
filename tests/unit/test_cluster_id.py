"""The local broker's cluster id is one `kafka-storage format -t` accepts."""

from __future__ import annotations

import base64
import uuid
from unittest import mock

from app.local import kafka


def test_a_cluster_id_never_starts_with_a_dash() -> None:
    dashed = uuid.UUID(bytes=base64.urlsafe_b64decode("-" + "A" * 21 + "=="))
    plain = uuid.UUID(int=1)
    with mock.patch.object(kafka.uuid, "uuid4", side_effect=[dashed, plain]):
        cluster = kafka._cluster_id()
    assert cluster == base64.urlsafe_b64encode(plain.bytes).decode().rstrip("=")
    assert len(cluster) == 22
