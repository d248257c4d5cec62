"""The transactional processor's decisions that need no broker: which failures end
its clients (so ``run`` starts new ones) and how it joins its group."""

from __future__ import annotations

import pytest
from confluent_kafka import KafkaError, KafkaException

from app.adapters.processor import Processor
from app.settings import Settings


def _processor() -> Processor:
    return Processor(
        Settings(), group="g.commands", transactional_id="app-host-8080-0", handlers=[]
    )


def test_it_is_a_static_member_under_its_transactional_id() -> None:
    config = _processor().consumer_config()
    assert config["group.instance.id"] == "app-host-8080-0"
    assert config["isolation.level"] == "read_committed"
    assert config["enable.auto.commit"] is False


@pytest.mark.parametrize(
    "code",
    [KafkaError._FATAL, KafkaError._FENCED, KafkaError._CONFLICT],
    ids=["fatal", "fenced", "conflict"],
)
def test_a_failure_that_ends_the_clients_is_raised(code: int) -> None:
    """A consumer librdkafka failed fatally (e.g. FENCED_INSTANCE_ID after a broker
    restart) polls nothing ever again: the abort raises, and ``run`` starts a new
    consumer under the same instance id, which takes the membership over."""
    failure = KafkaException(KafkaError(code))
    processor = _processor()
    with pytest.raises(KafkaException) as raised:
        processor._abort(None, failure, 3, begun=False)  # type: ignore[arg-type]
    assert raised.value is failure
    assert processor.report.aborts == 1


def test_a_passing_failure_is_aborted_and_the_processor_goes_on() -> None:
    processor = _processor()
    failure = KafkaException(KafkaError(KafkaError._TRANSPORT))
    processor._abort(None, failure, 3, begun=False)  # type: ignore[arg-type]
    assert processor.report.aborts == 1
    assert processor.report.last_error == str(failure)
