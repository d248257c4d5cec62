"""Settings are read once from the environment and refuse bad values by name."""

from __future__ import annotations

import pytest

from app.settings import Settings, SettingsError

# Environments the tests read, and check that ``as_env`` gives them back.
CUSTOM = {
    "KAFKA_BOOTSTRAP_SERVERS": "a:1,b:2",
    "STREAMFOLD_PARTITIONS": "8",
    "STREAMFOLD_TOPIC_PREFIX": "shop.",
    "STREAMFOLD_COMMAND_TIMEOUT": "2.5",
    "STREAMFOLD_PROJECTION_PROCESSES": "3",
    "STREAMFOLD_WS_MAX_CONNECTIONS": "7",
    "STREAMFOLD_WS_MAX_SUBSCRIPTIONS": "2",
    "STREAMFOLD_WS_QUEUE": "640",
}
SASL = {
    "KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
    "KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
    "KAFKA_SASL_USERNAME": "svc",
    "KAFKA_SASL_PASSWORD": "secret",
}


def test_defaults_match_the_native_setup() -> None:
    settings = Settings.from_env({})
    assert settings.bootstrap_servers == "127.0.0.1:9092"
    assert settings.schema_registry_url == "http://127.0.0.1:8081"
    assert settings.database_url.endswith("@127.0.0.1:5432/streamfold")
    assert settings.topics.events("orders") == "orders.events"
    assert settings.topics.results == "command-results"
    assert settings.producer_config()["acks"] == "all"
    assert settings.producer_config()["enable.idempotence"] is True


def test_values_are_parsed() -> None:
    settings = Settings.from_env(CUSTOM)
    assert settings.partitions == 8
    assert settings.projection_processes == 3
    assert (settings.ws_max_connections, settings.ws_max_subscriptions) == (7, 2)
    assert settings.ws_queue == 640
    assert settings.topics.commands("orders") == "shop.orders.commands"
    assert settings.command_timeout_s == 2.5


@pytest.mark.parametrize(
    ("variable", "value", "fragment"),
    [
        ("KAFKA_BOOTSTRAP_SERVERS", "localhost", "host:port"),
        ("KAFKA_BOOTSTRAP_SERVERS", "h:99999", "host:port"),
        ("DATABASE_URL", "mysql://x/y", "postgresql://"),
        ("SCHEMA_REGISTRY_URL", "registry:8081", "http"),
        ("STREAMFOLD_PARTITIONS", "zero", "whole number"),
        ("STREAMFOLD_PARTITIONS", "0", "between 1 and 1024"),
        ("STREAMFOLD_STORE", "redis", "rocksdb, memory"),
        ("STREAMFOLD_TOPIC_PREFIX", "bad prefix!", "letters"),
        ("STREAMFOLD_COMMAND_TIMEOUT", "soon", "seconds"),
        ("STREAMFOLD_PROJECTION_PROCESSES", "0", "between 1 and 64"),
        ("KAFKA_PRODUCER_ACKS", "1", "must be one of all"),
        ("KAFKA_ENABLE_IDEMPOTENCE", "false", "must be one of true"),
        ("KAFKA_SECURITY_PROTOCOL", "SASL_PLAINTEXT", "KAFKA_SASL_MECHANISM"),
        ("KAFKA_SSL_CAFILE", "/no/such/ca.pem", "no such file"),
    ],
)
def test_bad_values_name_the_variable(variable: str, value: str, fragment: str) -> None:
    with pytest.raises(SettingsError) as caught:
        Settings.from_env({variable: value})
    message = str(caught.value)
    assert fragment in message
    assert caught.value.variable in message


def test_sasl_without_credentials_is_refused() -> None:
    with pytest.raises(SettingsError, match="KAFKA_SASL_PASSWORD"):
        Settings.from_env(
            {
                "KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
                "KAFKA_SASL_MECHANISM": "SCRAM-SHA-256",
                "KAFKA_SASL_USERNAME": "svc",
            }
        )


def test_mechanism_without_sasl_protocol_never_falls_back() -> None:
    with pytest.raises(SettingsError, match="without authentication"):
        Settings.from_env({"KAFKA_SASL_MECHANISM": "SCRAM-SHA-256"})


def test_sasl_settings_reach_the_client_config() -> None:
    settings = Settings.from_env(SASL)
    config = settings.producer_config()
    assert config["security.protocol"] == "SASL_PLAINTEXT"
    assert config["sasl.mechanism"] == "SCRAM-SHA-512"
    assert config["sasl.username"] == "svc"


@pytest.mark.parametrize("env", [{}, CUSTOM, SASL], ids=["defaults", "custom", "sasl"])
def test_as_env_round_trips(env: dict[str, str]) -> None:
    settings = Settings.from_env(env)
    assert Settings.from_env(settings.as_env()) == settings


def test_the_log_level_is_checked_and_passed_on() -> None:
    assert Settings.from_env({}).log_level == "warning"
    settings = Settings.from_env({"STREAMFOLD_LOG_LEVEL": "INFO"})
    assert settings.log_level == "info"
    assert settings.as_env()["STREAMFOLD_LOG_LEVEL"] == "info"
    with pytest.raises(SettingsError, match=r"STREAMFOLD_LOG_LEVEL.*loud"):
        Settings.from_env({"STREAMFOLD_LOG_LEVEL": "loud"})
