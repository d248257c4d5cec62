"""A topic created a moment ago answers NOT_LEADER / UNKNOWN_TOPIC until its partitions
have leaders: ``partitions_of`` and ``watermarks`` ask again; any other error, or one
that outlasts the timeout, is raised."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException

from app.adapters.topics import partitions_of, watermarks


class Settling:
    """A consumer whose broker answers with ``errors`` first, then for real."""

    def __init__(self, errors: list[int]) -> None:
        self.errors = list(errors)
        self.calls = 0

    def get_watermark_offsets(self, tp: Any, timeout: float) -> tuple[int, int]:
        self.calls += 1
        if self.errors:
            raise KafkaException(KafkaError(self.errors.pop(0)))
        return (0, 7) if tp.partition == 1 else (0, 3)

    def list_topics(self, topic: str, timeout: float) -> Any:
        self.calls += 1
        if self.errors:
            error = KafkaError(self.errors.pop(0))
            return SimpleNamespace(
                topics={topic: SimpleNamespace(error=error, partitions={})}
            )
        parts = {0: None, 1: None}
        return SimpleNamespace(
            topics={topic: SimpleNamespace(error=None, partitions=parts)}
        )


def test_watermarks_are_asked_again_while_a_new_partition_has_no_leader() -> None:
    consumer = Settling(
        [KafkaError.NOT_LEADER_FOR_PARTITION, KafkaError.LEADER_NOT_AVAILABLE]
    )
    assert watermarks(consumer, "t", 1) == (0, 7)
    assert consumer.calls == 3


def test_partitions_are_asked_again_while_a_new_topic_is_unknown() -> None:
    consumer = Settling([KafkaError.UNKNOWN_TOPIC_OR_PART])
    assert partitions_of(consumer, "t") == [0, 1]
    assert consumer.calls == 2


def test_other_errors_are_raised_at_once() -> None:
    consumer = Settling([KafkaError.TOPIC_AUTHORIZATION_FAILED])
    with pytest.raises(KafkaException):
        watermarks(consumer, "t", 0)
    assert consumer.calls == 1
    consumer = Settling([KafkaError.TOPIC_AUTHORIZATION_FAILED])
    with pytest.raises(KafkaException):
        partitions_of(consumer, "t")


def test_a_partition_that_never_settles_is_raised_after_the_timeout() -> None:
    consumer = Settling([KafkaError.NOT_LEADER_FOR_PARTITION] * 1000)
    with pytest.raises(KafkaException):
        watermarks(consumer, "t", 0, timeout=0.5)
    assert 1 < consumer.calls < 1000
