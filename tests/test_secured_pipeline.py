"""The pipeline end to end over SASL_SSL on the real broker (issue 18).

The project's launcher starts Apache Kafka with one client listener, SASL_SSL
(SCRAM-SHA-512, a certificate issued for the run), and StandardAuthorizer with
no access without an ACL (cli/broker.py, ``LocalKafka(security="SASL_SSL")``).
Three principals besides the admin: the worker (the ACLs ``worker_acls`` grants),
a producer (WRITE and DESCRIBE on the pipeline's topics, no READ) and a reader
(READ on the scores topic only). Checked:

- the broker has no plaintext listener, and a plaintext client gets nothing;
- a worker with a wrong password exits non-zero at once saying authentication
  failed and which settings to check, and commits no offset of the records
  waiting for it;
- the worker with its password and only its ACLs publishes a score for every
  patient, which the reader reads;
- the producer, without READ on the scores topic, is refused
  (TopicAuthorizationFailed).

A secured broker that cannot start fails the module's tests, never skips them.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
import uuid

import pytest
from aiokafka.errors import TopicAuthorizationFailedError

from cli.broker import Acl, broker_answers, worker_acls
from cli.kafka_io import group_lag, read_to_end, read_until
from cli.programme import build_programme
from cli.simulate import publish
from cli.worker_process import READY, WorkerProcess
from streams.topics import SOURCE_TOPICS, ensure_topics

pytestmark = pytest.mark.kafka
PATIENTS = 24
RAW_TOPICS = ("enrollments", *SOURCE_TOPICS)


@pytest.fixture(scope="module")
def secured_kafka():
    """A SASL_SSL broker of the project's launcher, with SCRAM users worker,
    producer and reader."""
    from cli.broker import BrokerError, LocalKafka

    kafka = LocalKafka(
        security="SASL_SSL",
        users=["worker", "producer", "reader"],
        log=lambda message: print(f"[secured kafka] {message}", flush=True),
    )
    try:
        kafka.start()
    except BrokerError as error:  # a broker that cannot start fails, never skips
        pytest.fail(f"the secured local Apache Kafka broker could not start: {error}")
    try:
        yield kafka
    finally:
        kafka.stop()


def worker_env(kafka, prefix: str, app_id: str, data_dir: str, password: str) -> dict[str, str]:
    return kafka.client_env("worker") | {
        "EFFICACY_SASL_PASSWORD": password,
        "EFFICACY_TOPIC_PREFIX": prefix,
        "EFFICACY_APP_ID": app_id,
        "EFFICACY_PARTITIONS": "2",
        "EFFICACY_WEB_ENABLED": "false",
        "EFFICACY_METRICS_PORT": "0",
        "EFFICACY_DATA_DIR": data_dir,
    }


def uncommitted(admin, group: str, topics: list[str]) -> int:
    """group_lag, once the broker has a group coordinator (its offsets topic is
    created on the first request for one: here, possibly this one)."""
    from aiokafka.errors import GroupCoordinatorNotAvailableError

    for _ in range(30):
        try:
            return asyncio.run(group_lag(admin, group, topics))
        except GroupCoordinatorNotAvailableError:
            time.sleep(1.0)
    return asyncio.run(group_lag(admin, group, topics))


@pytest.fixture(scope="module")
def run(secured_kafka, tmp_path_factory):
    kafka = secured_kafka
    run_id = uuid.uuid4().hex[:8]
    prefix, app_id = f"secure-{run_id}.", f"secure-{run_id}"
    admin = kafka.client_settings("admin", topic_prefix=prefix, partitions=2, app_id=app_id)
    producer = kafka.client_settings("producer", topic_prefix=prefix, partitions=2)
    reader = kafka.client_settings("reader", topic_prefix=prefix)
    kafka.create_acls(
        [
            *worker_acls("worker", prefix, app_id),
            Acl("User:producer", "TOPIC", prefix, "WRITE", "PREFIXED"),
            Acl("User:producer", "TOPIC", prefix, "DESCRIBE", "PREFIXED"),
            Acl("User:reader", "TOPIC", prefix + "scores", "READ"),
            Acl("User:reader", "TOPIC", prefix + "scores", "DESCRIBE"),
        ]
    )
    asyncio.run(ensure_topics(admin))
    programme = build_programme(
        ["resting_heart_rate"], num_patients=PATIENTS, num_cohorts=4, obs_per_patient=8, seed=18
    )
    counts = asyncio.run(publish(programme, producer))
    published = sum(counts.get(topic, 0) for topic in RAW_TOPICS)

    wrong = WorkerProcess(
        worker_env(kafka, prefix, app_id, str(tmp_path_factory.mktemp("faust")), "not-the-password")
    )
    wrong.start()
    wrong_code = wrong.wait(timeout=180)
    wrong_log = wrong.log_text()
    wrong.kill()  # only if it still runs: then the exit code above is None and fails the test
    print(f"wrong-password worker: exit {wrong_code}, {wrong_log.strip().splitlines()[-1:]}")
    lag_after_wrong = uncommitted(admin, app_id, [prefix + t for t in RAW_TOPICS])

    password = kafka.passwords["worker"]
    env = worker_env(kafka, prefix, app_id, str(tmp_path_factory.mktemp("faust")), password)
    with WorkerProcess(env) as worker:
        worker.wait_for_log(READY, timeout=300)
        scores = asyncio.run(
            read_until(
                reader,
                [prefix + "scores"],
                done=lambda records: len({r.key for r in records}) >= PATIENTS,
                timeout=300,
            )
        )
        log = worker.log_tail(60)
        print(f"{len(scores)} scores of {len({r.key for r in scores})} patients")
        assert worker.stop() == 0, log
    return {
        "kafka": kafka,
        "prefix": prefix,
        "admin": admin,
        "producer": producer,
        "published": published,
        "wrong_code": wrong_code,
        "wrong_log": wrong_log,
        "lag_after_wrong": lag_after_wrong,
        "scores": scores,
        "log": log,
    }


def test_the_broker_has_no_plaintext_listener(run):
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

    from streams.kafka_options import aiokafka_options

    async def broker_config() -> dict[str, str]:
        admin = AIOKafkaAdminClient(**aiokafka_options(run["admin"]))
        await admin.start()
        try:
            [response] = await admin.describe_configs(
                [ConfigResource(ConfigResourceType.BROKER, "1")]
            )
            [resource] = response.resources
            return {entry[0]: entry[1] for entry in resource[4]}
        finally:
            await admin.close()

    config = asyncio.run(broker_config())
    listeners = config["listeners"].split(",")
    advertised = config["advertised.listeners"].split(",")
    protocols = dict(
        pair.split(":") for pair in config["listener.security.protocol.map"].split(",")
    )
    assert [listener.split("://")[0] for listener in advertised] == ["SASL_SSL"], advertised
    assert {protocols[listener.split("://")[0]] for listener in listeners} == {"SASL_SSL"}, config[
        "listener.security.protocol.map"
    ]
    # and a client that does not speak TLS and SASL gets no metadata from it
    assert not broker_answers(run["kafka"].bootstrap_servers)


def test_a_wrong_password_stops_the_worker_with_an_authentication_error(run):
    """It exits non-zero before consuming: every published record is still
    uncommitted for its group."""
    log = run["wrong_log"]
    assert run["wrong_code"] not in (None, 0), log[-3000:]
    assert "authentication failed" in log.lower(), log[-3000:]
    assert "EFFICACY_SASL_PASSWORD" in log, log[-3000:]
    assert "not-the-password" not in log
    assert not re.search(READY, log), log[-3000:]
    assert run["published"] > 0
    assert run["lag_after_wrong"] == run["published"]


def test_the_worker_scores_every_patient_over_sasl_ssl(run):
    patients = {record.key for record in run["scores"]}
    assert len(patients) == PATIENTS, run["log"]


def test_only_a_principal_with_read_on_scores_reads_them(run):
    """The reader read the scores (above); the producer, allowed to write and
    describe the pipeline's topics but not to read them, is refused."""
    assert run["scores"], run["log"]
    with pytest.raises(TopicAuthorizationFailedError):
        asyncio.run(read_to_end(run["producer"], run["prefix"] + "scores", timeout=60))


def test_an_untrusted_broker_certificate_names_the_ca_setting(secured_kafka, tmp_path):
    import trustme

    from streams.kafka_options import refusal

    other = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other))
    trusted = secured_kafka.client_settings("reader")
    assert asyncio.run(refusal(trusted)) is None
    why = asyncio.run(refusal(trusted.model_copy(update={"ssl_cafile": other})))
    assert why is not None and "EFFICACY_SSL_CAFILE" in why, why


def test_command_line_starts_a_secured_broker_and_clients_connect_with_its_settings(
    secured_kafka, tmp_path
):
    """`python -m cli.broker start --security sasl_ssl` writes the client settings;
    `efficacy scores` connects with them (no topic yet: exit 1, saying so), and
    with a wrong password exits 2 naming the setting. (Its own cache folder, the
    jars linked from the shared one that secured_kafka resolved.)"""
    import shlex
    import subprocess
    import sys
    from pathlib import Path

    from cli import broker

    repo = Path(__file__).resolve().parent.parent
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "libs").symlink_to(broker.cache_dir() / "libs")
    (cache / "libs.sha256").write_text((broker.cache_dir() / "libs.sha256").read_text())
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("EFFICACY_", "KAFKA_"))}
    env = clean | {"EFFICACY_CACHE_DIR": str(cache)}

    def run(*command: str, extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", *command], capture_output=True, text=True, cwd=repo,
            env=env | (extra or {}), timeout=300, check=False,
        )  # fmt: skip

    started = run("cli.broker", "start", "--security", "sasl_ssl")
    try:
        assert started.returncode == 0, started.stderr
        client_env = cache / "run" / "client.env"
        assert client_env.stat().st_mode & 0o077 == 0
        settings = {}
        for line in client_env.read_text().splitlines():
            key, _, value = line.partition("=")
            settings[key] = shlex.split(value)[0]
        assert settings["EFFICACY_SECURITY_PROTOCOL"] == "SASL_SSL"
        assert settings["EFFICACY_BOOTSTRAP_SERVERS"] == started.stdout.strip().splitlines()[-1]
        status = run("cli.broker", "status")
        assert status.returncode == 0 and "SASL_SSL" in status.stdout, status
        scores = run("cli.main", "scores", extra=settings)
        assert scores.returncode == 1 and "no topic" in scores.stderr, scores.stderr[-2000:]
        wrong = run("cli.main", "scores", extra=settings | {"EFFICACY_SASL_PASSWORD": "wrong"})
        assert wrong.returncode == 2, wrong.stderr[-2000:]
        assert "authentication failed" in wrong.stderr, wrong.stderr[-2000:]
        assert "EFFICACY_SASL_PASSWORD" in wrong.stderr, wrong.stderr[-2000:]
    finally:
        stopped = run("cli.broker", "stop")
    assert stopped.returncode == 0, stopped.stderr
    assert not (cache / "run" / "client.env").exists()
