"""Keys go to the partition every other Kafka client picks for them: our murmur2 is
Kafka's (its Java client's test vectors) and aiokafka's (Faust's router) byte for
byte, and a write process runs without importing aiokafka for it."""

from __future__ import annotations

import random
import subprocess
import sys

import pytest
from aiokafka.partitioner import murmur2 as aiokafkas

from app.adapters.eventlog import murmur2, partition_for


def signed(value: int) -> int:
    return value - (1 << 32) if value >= 1 << 31 else value


@pytest.mark.parametrize(
    ("key", "java"),
    [
        ("21", -973932308),
        ("foobar", -790332482),
        ("a-little-bit-long-string", -985981536),
        ("a-little-bit-longer-string", -1486304829),
        ("lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8", -58897971),
        ("abc", 479470107),
    ],
)
def test_murmur2_is_kafkas(key: str, java: int) -> None:
    assert signed(murmur2(key.encode())) == java


def test_murmur2_and_the_partition_agree_with_aiokafka_for_every_length() -> None:
    draw = random.Random(7)
    for length in range(0, 70):
        for _ in range(50):
            key = bytes(draw.randrange(256) for _ in range(length))
            assert murmur2(key) == aiokafkas(key) & 0xFFFFFFFF, key
            for partitions in (1, 4, 12):
                assert partition_for(key, partitions) == (
                    (aiokafkas(key) & 0x7FFFFFFF) % partitions
                )


def test_a_write_process_does_not_import_aiokafka() -> None:
    imported = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, app.writer; print('aiokafka' in sys.modules)",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert imported.stdout.strip() == "False"
