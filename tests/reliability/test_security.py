"""Kafka security against a second local broker with a SASL_PLAINTEXT SCRAM listener
and ACLs: every Streamfold client authenticates, a read-only principal cannot produce
commands, and a wrong password fails clearly instead of falling back."""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka import KafkaException, Producer
from confluent_kafka.admin import (
    AclBinding,
    AclOperation,
    AclPermissionType,
    AdminClient,
    ResourcePatternType,
    ResourceType,
)

from app.adapters import topics
from app.client import CommandClient
from app.domain.accounts import OpenAccount
from app.local.kafka import KafkaNode
from app.local.registry import RegistryProcess
from app.settings import Settings, Topics
from tests.conftest import free_port
from tests.support import running_worker

# One test process runs the whole module: its module-scoped deployment is set up
# once (bin/streamfold test runs with --dist loadgroup).
pytestmark = pytest.mark.xdist_group(__name__)

MECHANISM = "SCRAM-SHA-256"
USERS = {"admin": "admin-secret", "worker": "worker-secret", "query": "query-secret"}


def _client(node: KafkaNode, user: str, password: str) -> dict[str, str]:
    return {
        "bootstrap.servers": node.bootstrap,
        "security.protocol": "SASL_PLAINTEXT",
        "sasl.mechanism": MECHANISM,
        "sasl.username": user,
        "sasl.password": password,
    }


@pytest.fixture(scope="module")
def sasl_kafka(kafka: KafkaNode) -> Iterator[KafkaNode]:
    home = Path(tempfile.mkdtemp(prefix="streamfold-sasl-"))
    port, controller = free_port(), free_port()
    jaas = (
        "org.apache.kafka.common.security.scram.ScramLoginModule required "
        f'username="admin" password="{USERS["admin"]}";'
    )
    node = KafkaNode(
        home=home,
        cache=kafka.cache,
        port=port,
        controller_port=controller,
        heap="384m",
        extra_config=f"""
listeners=SASL_PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller}
advertised.listeners=SASL_PLAINTEXT://127.0.0.1:{port}
inter.broker.listener.name=SASL_PLAINTEXT
listener.security.protocol.map=SASL_PLAINTEXT:SASL_PLAINTEXT,CONTROLLER:PLAINTEXT
sasl.enabled.mechanisms={MECHANISM}
sasl.mechanism.inter.broker.protocol={MECHANISM}
listener.name.sasl_plaintext.scram-sha-256.sasl.jaas.config={jaas}
authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer
# The controller listener is loopback-only and PLAINTEXT; its principal is ANONYMOUS.
super.users=User:admin;User:ANONYMOUS
allow.everyone.if.no.acl.found=false
""",
        client_config=tuple(_client_config_items("admin")),
        format_args=tuple(
            arg
            for user, password in USERS.items()
            for arg in ("--add-scram", f"{MECHANISM}=[name={user},password={password}]")
        ),
    )
    node.start(timeout=120)
    try:
        _grant(node)
        yield node
    finally:
        node.stop()
        shutil.rmtree(home, ignore_errors=True)


def _grant(node: KafkaNode) -> None:
    admin = AdminClient(_client(node, "admin", USERS["admin"]))
    # "*" as a literal name is Kafka's wildcard: every topic, group or id.
    grants = [
        # The worker may do anything Streamfold does, on its own topics and groups.
        ("User:worker", ResourceType.TOPIC, "*", AclOperation.ALL),
        ("User:worker", ResourceType.GROUP, "*", AclOperation.ALL),
        ("User:worker", ResourceType.TRANSACTIONAL_ID, "*", AclOperation.ALL),
        ("User:worker", ResourceType.BROKER, "kafka-cluster", AclOperation.ALL),
        # The query principal reads; it never writes.
        ("User:query", ResourceType.TOPIC, "*", AclOperation.READ),
        ("User:query", ResourceType.TOPIC, "*", AclOperation.DESCRIBE),
        ("User:query", ResourceType.GROUP, "*", AclOperation.READ),
    ]
    bindings = [
        AclBinding(
            resource,
            name,
            ResourcePatternType.LITERAL,
            principal,
            "*",
            operation,
            AclPermissionType.ALLOW,
        )
        for principal, resource, name, operation in grants
    ]
    for future in admin.create_acls(bindings).values():
        future.result(timeout=30)


def _client_config_items(user: str) -> list[tuple[str, str]]:
    return [
        ("security.protocol", "SASL_PLAINTEXT"),
        ("sasl.mechanism", MECHANISM),
        ("sasl.username", user),
        ("sasl.password", USERS[user]),
    ]


def _settings(base: Settings, node: KafkaNode, user: str, password: str) -> Settings:
    return dataclasses.replace(
        base,
        bootstrap_servers=node.bootstrap,
        security_protocol="SASL_PLAINTEXT",
        sasl_mechanism=MECHANISM,
        sasl_username=user,
        sasl_password=password,
    )


def test_every_client_authenticates_end_to_end(
    sasl_kafka: KafkaNode, deployment: Settings
) -> None:
    registry_port = free_port()
    settings = dataclasses.replace(
        _settings(deployment, sasl_kafka, "worker", USERS["worker"]),
        registry_port=registry_port,
        schema_registry_url=f"http://127.0.0.1:{registry_port}",
        topics=Topics(prefix="secure."),
    )
    topics.ensure_topics(settings)
    registry = RegistryProcess(settings)
    registry.start()
    try:
        with running_worker(settings), CommandClient(settings) as client:
            result = client.send(
                OpenAccount(account_id="acc-secure", owner_id="o", currency="USD"),
                timeout=60,
            )
        assert result.accepted
        assert result.version == 1
    finally:
        registry.stop()


def test_the_query_principal_cannot_produce_commands(
    sasl_kafka: KafkaNode, deployment: Settings
) -> None:
    settings = _settings(deployment, sasl_kafka, "worker", USERS["worker"])
    topics.ensure_topics(dataclasses.replace(settings, topics=Topics(prefix="acl.")))
    errors: list[str] = []
    query = _settings(deployment, sasl_kafka, "query", USERS["query"])
    # A plain producer: an idempotent one would fail earlier, on the cluster's
    # IdempotentWrite permission, which hides the topic-level refusal asserted here.
    producer = Producer({**query.kafka_client_config(), "message.timeout.ms": 10_000})
    producer.produce(
        "acl.accounts.commands",
        b"x",
        key=b"k",
        on_delivery=lambda error, _msg: errors.append(
            error.str() if error else "delivered"
        ),
    )
    producer.flush(30)
    assert len(errors) == 1
    assert "authoriz" in errors[0].lower()


def test_a_wrong_password_fails_clearly_and_never_unauthenticated(
    sasl_kafka: KafkaNode, deployment: Settings
) -> None:
    wrong = _settings(deployment, sasl_kafka, "worker", "not-the-password")
    with pytest.raises(topics.AuthenticationFailed) as caught:
        topics.ensure_topics(wrong)
    message = str(caught.value)
    assert "refused the credentials of 'worker' (SCRAM-SHA-256)" in message
    assert "authentication failed" in message.lower()
    # The same credentials against a PLAINTEXT broker fail too: no silent downgrade.
    plain = dataclasses.replace(
        wrong, bootstrap_servers="127.0.0.1:9092", sasl_password=USERS["worker"]
    )
    admin = topics.admin_client(plain)
    with pytest.raises(KafkaException):
        admin.list_topics(timeout=5)
