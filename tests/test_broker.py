"""The local Kafka launcher: a real broker answers; clear errors when it cannot start."""

from __future__ import annotations

import asyncio
import itertools
import os
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from cli import broker
from cli.broker import BrokerError, LocalKafka

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.kafka
def test_broker_answers_metadata_and_round_trips_a_record(kafka_bootstrap):
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

    assert broker.broker_answers(kafka_bootstrap)
    topic = f"roundtrip-{uuid.uuid4().hex[:8]}"

    async def round_trip() -> bytes:
        producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
        await producer.start()
        try:
            await producer.send_and_wait(topic, b"ping", key=b"k")
        finally:
            await producer.stop()
        consumer = AIOKafkaConsumer(
            topic, bootstrap_servers=kafka_bootstrap, auto_offset_reset="earliest"
        )
        await consumer.start()
        try:
            message = await asyncio.wait_for(consumer.getone(), timeout=30)
        finally:
            await consumer.stop()
        return message.value

    assert asyncio.run(round_trip()) == b"ping"


def test_cluster_ids_never_start_with_a_dash(monkeypatch):
    """Kafka's storage tool reads a cluster id starting with "-" as an option and
    the broker never starts (1 start in 64). Draws are forced onto such ids first."""
    import base64

    dash_first = base64.urlsafe_b64decode("-" + "A" * 21 + "==")  # 16 bytes, "-" first
    real = uuid.uuid4
    draws = itertools.chain([uuid.UUID(bytes=dash_first)] * 3, iter(real, None))
    monkeypatch.setattr(broker.uuid, "uuid4", lambda: next(draws))
    ids = [broker._cluster_id() for _ in range(200)]
    assert not any(i.startswith("-") for i in ids)
    assert all(len(i) == 22 for i in ids)


def test_missing_java_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty directory: no java, no mvn
    with pytest.raises(BrokerError, match=r"'java' was not found.*openjdk-17"):
        LocalKafka(cache=tmp_path / "cache").start()


def test_missing_maven_is_a_clear_error_when_jars_are_not_cached(monkeypatch, tmp_path):
    real_which = broker.shutil.which
    monkeypatch.setattr(
        broker.shutil, "which", lambda name: None if name == "mvn" else real_which(name)
    )
    with pytest.raises(BrokerError, match=r"'mvn' was not found.*Maven Central"):
        LocalKafka(cache=tmp_path / "empty-cache").start()


def test_port_in_use_is_a_clear_error(tmp_path):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(BrokerError, match=f"port {port} on 127.0.0.1 is already in use"):
            LocalKafka(port=port, cache=tmp_path).start()


@pytest.mark.kafka
def test_command_line_start_status_stop(tmp_path, kafka_bootstrap):
    """`python -m cli.broker start|status|stop` manages a detached broker.
    (Depends on kafka_bootstrap only so the jars are resolved once, up front.)"""
    env = {**os.environ, "EFFICACY_CACHE_DIR": str(broker.cache_dir())}
    state = broker.cache_dir() / "run" / "broker.json"
    if state.exists():
        pytest.fail(f"a detached broker from an earlier run is recorded in {state}")
    run = lambda *a: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "cli.broker", *a],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=180, check=False,
    )  # fmt: skip
    started = run("start")
    try:
        assert started.returncode == 0, started.stderr
        bootstrap = started.stdout.strip().splitlines()[-1]
        assert bootstrap.startswith("127.0.0.1:")
        assert broker.broker_answers(bootstrap)
        status = run("status")
        assert status.returncode == 0 and "running" in status.stdout
    finally:
        stopped = run("stop")
    assert stopped.returncode == 0, stopped.stderr
    assert not state.exists()
    assert run("status").returncode == 1
