"""Worker settings from the environment."""

from __future__ import annotations

import ssl

import faust
import pytest
from pydantic import ValidationError

from streams.kafka_options import aiokafka_options, faust_credentials
from streams.settings import Settings


def test_defaults_and_prefixed_environment(monkeypatch):
    monkeypatch.setenv("EFFICACY_TOPIC_PREFIX", "prog-a.")
    monkeypatch.setenv("EFFICACY_PARTITIONS", "8")
    settings = Settings()
    assert settings.topic("scores") == "prog-a.scores"
    assert settings.partitions == 8
    assert faust_credentials(settings) is None
    assert aiokafka_options(settings) == {"bootstrap_servers": settings.bootstrap_servers}


def test_kafka_bootstrap_servers_alias_and_broker_url(monkeypatch):
    monkeypatch.delenv("EFFICACY_BOOTSTRAP_SERVERS", raising=False)
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "a:9092, b:9093")
    settings = Settings()
    assert settings.bootstrap_servers == "a:9092, b:9093"
    assert settings.broker_url == "kafka://a:9092;kafka://b:9093"


def test_sasl_needs_username_and_password(monkeypatch):
    monkeypatch.setenv("EFFICACY_SECURITY_PROTOCOL", "SASL_SSL")
    with pytest.raises(ValidationError, match="EFFICACY_SASL_USERNAME"):
        Settings()
    monkeypatch.setenv("EFFICACY_SASL_USERNAME", "svc")
    monkeypatch.setenv("EFFICACY_SASL_PASSWORD", "s3cret")
    monkeypatch.setenv("EFFICACY_SASL_MECHANISM", "SCRAM-SHA-512")
    settings = Settings()
    assert "s3cret" not in repr(settings)  # SecretStr
    credentials = faust_credentials(settings)
    assert isinstance(credentials, faust.SASLCredentials)
    assert credentials.username == "svc"
    assert credentials.password == "s3cret"
    assert str(credentials.mechanism.value) == "SCRAM-SHA-512"
    assert isinstance(credentials.ssl_context, ssl.SSLContext)
    # the aiokafka clients (CLI, demo, producers, the posterior feed) get the same
    options = aiokafka_options(settings)
    assert options["security_protocol"] == "SASL_SSL"
    assert options["sasl_mechanism"] == "SCRAM-SHA-512"
    assert (options["sasl_plain_username"], options["sasl_plain_password"]) == ("svc", "s3cret")
    assert isinstance(options["ssl_context"], ssl.SSLContext)


def test_invalid_values_are_rejected(monkeypatch):
    monkeypatch.setenv("EFFICACY_PARTITIONS", "0")
    with pytest.raises(ValidationError, match="partitions"):
        Settings()


def test_a_retired_setting_is_an_error_naming_its_replacement(monkeypatch):
    monkeypatch.setenv("EFFICACY_STATE_CACHE_PATIENTS", "0")
    with pytest.raises(ValidationError, match="EFFICACY_STATE_CACHE_MB"):
        Settings()
    monkeypatch.delenv("EFFICACY_STATE_CACHE_PATIENTS")
    monkeypatch.setenv("EFFICACY_STATE_CACHE_MB", "0")
    assert Settings().state_cache_mb == 0


def test_drift_thresholds_from_the_environment(monkeypatch):
    monkeypatch.setenv("EFFICACY_DRIFT__SHIFT_THRESHOLD", "5.5")
    monkeypatch.setenv("EFFICACY_DRIFT__KL_THRESHOLD", "20")
    settings = Settings()
    assert settings.drift.shift_threshold == 5.5
    assert settings.drift.kl_threshold == 20.0
    monkeypatch.setenv("EFFICACY_DRIFT__SHIFT_THRESHOLD", "-1")
    with pytest.raises(ValidationError, match="shift_threshold"):
        Settings()


def test_pathway_table_from_the_environment(monkeypatch):
    assert Settings().pathways == {"non_responder": "alternative_pathway"}
    monkeypatch.setenv(
        "EFFICACY_PATHWAYS", '{"non_responder": "clinical_escalation", "uncertain": "review"}'
    )
    assert Settings().pathways["non_responder"] == "clinical_escalation"


def test_advertised_web_host_reaches_the_bound_address(monkeypatch):
    import socket

    monkeypatch.setenv("EFFICACY_WEB_PORT", "6070")
    assert Settings().advertised_web_host == "127.0.0.1"  # loopback by default
    assert Settings(web_bind="10.0.0.5").advertised_web_host == "10.0.0.5"
    assert Settings(web_bind="0.0.0.0").advertised_web_host == socket.gethostname()
    assert Settings(web_bind="0.0.0.0", web_host="worker-1").advertised_web_host == "worker-1"
    assert Settings().web_port == 6070
