"""A real Apache Kafka broker on this machine, without Docker.

The pinned release is resolved from Maven Central with the pom in ``infra/kafka``; the
jars are cached outside the repository and reused. One KRaft process plays broker and
controller on 127.0.0.1:9092 with a small heap.
"""

from __future__ import annotations

import hashlib
import logging
import re
import shutil
import subprocess
import sys
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

from app.local.process import Daemon, ServiceError

REPO = Path(__file__).resolve().parents[2]
POM = REPO / "infra" / "kafka" / "pom.xml"

# Kafka's own command-line tools, by the short name users know from bin/*.sh.
TOOLS = {
    "consumer-groups": "org.apache.kafka.tools.consumer.group.ConsumerGroupCommand",
    "topics": "org.apache.kafka.tools.TopicCommand",
    "configs": "org.apache.kafka.tools.ConfigCommand",
    "acls": "org.apache.kafka.tools.AclCommand",
    "console-consumer": "org.apache.kafka.tools.consumer.ConsoleConsumer",
    "console-producer": "org.apache.kafka.tools.ConsoleProducer",
    "storage": "kafka.tools.StorageTool",
    # Open and hanging transactions (list, describe, find-hanging, abort): a
    # transaction left open holds every read_committed reader of its partitions.
    "transactions": "org.apache.kafka.tools.TransactionsCommand",
    "get-offsets": "org.apache.kafka.tools.GetOffsetShell",
}


def pinned_version() -> str:
    match = re.search(r"<kafka.version>([^<]+)</kafka.version>", POM.read_text())
    if not match:
        raise ServiceError(f"{POM} has no <kafka.version> property")
    return match.group(1)


@dataclass(frozen=True, slots=True)
class KafkaNode:
    """Paths and ports of the local single-node cluster."""

    home: Path
    cache: Path
    port: int = 9092
    controller_port: int = 9093
    heap: str = "512m"
    extra_config: str = ""
    # librdkafka settings for the readiness probe (a SASL listener needs credentials).
    client_config: tuple[tuple[str, str], ...] = ()
    # Extra `kafka-storage format` arguments, e.g. SCRAM credentials to create.
    format_args: tuple[str, ...] = ()

    @property
    def version(self) -> str:
        return pinned_version()

    @property
    def libs(self) -> Path:
        return self.cache / f"kafka-{self.version}" / "libs"

    @property
    def data(self) -> Path:
        return self.home / "kafka"

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def resolve(self) -> Path:
        """Download the pinned jars once; later calls find them in the cache."""
        marker = self.libs / ".complete"
        # The marker holds the pom's digest, so editing the pom resolves again.
        wanted = hashlib.sha256(POM.read_bytes()).hexdigest()
        if marker.exists() and marker.read_text() == wanted:
            return self.libs
        if shutil.which("mvn") is None:
            raise ServiceError(
                "Maven (mvn) is required to fetch Kafka; install it first"
            )
        self.libs.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=self.libs.parent, prefix=".libs-"))
        result = subprocess.run(
            [
                "mvn",
                "-q",
                "-B",
                "-f",
                str(POM),
                "dependency:copy-dependencies",
                f"-DoutputDirectory={staging}",
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            shutil.rmtree(staging, ignore_errors=True)
            raise ServiceError(
                f"mvn could not resolve Kafka {self.version}:\n{result.stdout[-2000:]}"
                f"{result.stderr[-2000:]}"
            )
        (staging / ".complete").write_text(wanted)
        if self.libs.exists():
            shutil.rmtree(self.libs)
        staging.rename(self.libs)
        return self.libs

    def java(self, main_class: str, *args: str, heap: str = "256m") -> list[str]:
        return [
            "java",
            "-Xms64m",
            f"-Xmx{heap}",
            "-XX:+UseSerialGC",
            "-Dlog4j2.configurationFile=" + str(self._log4j()),
            "-cp",
            f"{self.libs}/*",
            main_class,
            *args,
        ]

    def tool(self, name: str, *args: str) -> subprocess.CompletedProcess[str]:
        """Run one of Kafka's own command-line tools from the same jars."""
        self.resolve()
        main_class = TOOLS.get(name, name)
        return subprocess.run(
            self.java(main_class, *args), capture_output=True, text=True, check=False
        )

    @property
    def daemon(self) -> Daemon:
        return Daemon(
            "kafka",
            self.java(
                "kafka.Kafka", str(self.data / "server.properties"), heap=self.heap
            ),
            self.data,
            ready=lambda: self.answers(timeout=2.0),
        )

    def running(self) -> bool:
        return self.daemon.pid() is not None and self.answers(timeout=2.0)

    def answers(self, timeout: float = 2.0) -> bool:
        from confluent_kafka.admin import AdminClient

        admin = AdminClient(
            {
                **dict(self.client_config),
                "bootstrap.servers": self.bootstrap,
                "log_level": 0,
            },
            logger=_silent_logger(),
        )
        try:
            admin.list_topics(timeout=timeout)
        except Exception:  # noqa: BLE001 - any failure means "not answering yet"
            return False
        return True

    def start(self, timeout: float = 90.0) -> bool:
        """Start the broker unless it already runs; True if this call started it."""
        if self.running():
            return False
        if self.answers(timeout=1.0):
            raise ServiceError(
                f"something else answers Kafka requests on {self.bootstrap}; "
                "stop it or set KAFKA_BOOTSTRAP_SERVERS to use it"
            )
        self.resolve()
        self.data.mkdir(parents=True, exist_ok=True)
        config = self._write_config()
        if not (self.data / "logs" / "meta.properties").exists():
            formatted = subprocess.run(
                self.java(
                    TOOLS["storage"],
                    "format",
                    "-t",
                    _cluster_id(),
                    "-c",
                    str(config),
                    "--standalone",
                    *self.format_args,
                ),
                capture_output=True,
                text=True,
                check=False,
            )
            if formatted.returncode != 0:
                raise ServiceError(f"kafka storage format failed:\n{formatted.stderr}")
        return self.daemon.start(timeout)

    def stop(self, timeout: float = 60.0, *, kill: bool = False) -> bool:
        return self.daemon.stop(timeout, kill=kill)

    def _write_config(self) -> Path:
        config = self.data / "server.properties"
        config.write_text(
            f"""# Written by streamfold; edits are overwritten at the next start.
process.roles=broker,controller
node.id=1
controller.quorum.bootstrap.servers=127.0.0.1:{self.controller_port}
listeners=PLAINTEXT://127.0.0.1:{self.port},CONTROLLER://127.0.0.1:{self.controller_port}
advertised.listeners=PLAINTEXT://127.0.0.1:{self.port}
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
log.dirs={self.data / "logs"}
num.partitions=1
offsets.topic.replication.factor=1
offsets.topic.num.partitions=8
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=4
share.coordinator.state.topic.replication.factor=1
group.initial.rebalance.delay.ms=0
auto.create.topics.enable=false
log.flush.interval.messages=9223372036854775807
message.max.bytes=10485760
{self.extra_config}
"""
        )
        return config

    def _log4j(self) -> Path:
        path = self.data / "log4j2.properties"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(
                "status = error\n"
                "appender.console.type = Console\n"
                "appender.console.name = STDOUT\n"
                "appender.console.layout.type = PatternLayout\n"
                "appender.console.layout.pattern = [%d] %p %m (%c)%n\n"
                "rootLogger.level = WARN\n"
                "rootLogger.appenderRefs = stdout\n"
                "rootLogger.appenderRef.stdout.ref = STDOUT\n"
                "logger.kafka.name = kafka\nlogger.kafka.level = WARN\n"
                "logger.started.name = kafka.server.KafkaRaftServer\n"
                "logger.started.level = INFO\n"
            )
        return path


def _cluster_id() -> str:
    # Kafka wants a base64url-encoded 16-byte UUID, as `kafka-storage random-uuid` prints.
    import base64

    while True:
        cluster = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        # One id in 64 starts with "-", which the tool reads as an option; Kafka's own
        # Uuid.randomUuid() draws again for the same reason.
        if not cluster.startswith("-"):
            return cluster


def _silent_logger() -> logging.Logger:
    logger = logging.getLogger("streamfold.kafka.probe")
    logger.addHandler(logging.NullHandler())
    logger.propagate = False
    return logger


if __name__ == "__main__":  # pragma: no cover - a convenience for debugging the pom
    node = KafkaNode(home=Path(sys.argv[1]), cache=Path(sys.argv[2]))
    print(node.resolve())
