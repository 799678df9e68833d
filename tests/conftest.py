"""Shared test setup: JAX on CPU in float64, and one real Kafka broker per session.

Broker selection (session scope), in order:
1. ``KAFKA_BOOTSTRAP_SERVERS`` if set (an existing broker);
2. testcontainers' Kafka container when a Docker engine answers;
3. the project's local launcher (Apache Kafka from Maven Central, KRaft, loopback).
A broker that cannot start fails every test that needs it: never a skip.
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # before anything imports jax
os.environ.setdefault("JAX_ENABLE_X64", "1")

import subprocess
from collections.abc import Iterator

import jax
import pytest

jax.config.update("jax_enable_x64", True)

BROKER_INFO: dict[str, str] = {}


def _docker_answers() -> bool:
    try:
        result = subprocess.run(["docker", "info"], capture_output=True, timeout=5, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    """Bootstrap servers of a real Apache Kafka broker (see module docstring)."""
    configured = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if configured:
        BROKER_INFO.update(kind="configured", bootstrap=configured)
        yield configured
        return
    if _docker_answers():
        from testcontainers.kafka import KafkaContainer

        try:
            container = KafkaContainer().with_kraft()
            container.start()
        except Exception as error:  # a broker that cannot start fails, never skips
            pytest.fail(f"testcontainers could not start Kafka: {error}")
        bootstrap = container.get_bootstrap_server()
        BROKER_INFO.update(kind="testcontainers", bootstrap=bootstrap)
        try:
            yield bootstrap
        finally:
            container.stop()
        return

    from cli.broker import BrokerError, LocalKafka

    kafka = LocalKafka(log=lambda message: print(f"[kafka] {message}", flush=True))
    try:
        bootstrap = kafka.start()
    except BrokerError as error:
        pytest.fail(f"the local Apache Kafka broker could not start: {error}")
    BROKER_INFO.update(
        kind="local Apache Kafka",
        version=str(kafka.version),
        bootstrap=bootstrap,
        startup=f"{kafka.startup_seconds:.1f} s",
    )
    try:
        yield bootstrap
    finally:
        kafka.stop()


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    if BROKER_INFO:
        details = ", ".join(f"{k}={v}" for k, v in BROKER_INFO.items())
        terminalreporter.write_line(f"Kafka broker used by this run: {details}")
