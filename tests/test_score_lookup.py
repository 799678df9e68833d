"""Score lookup over HTTP on the real broker (issue 7): two workers with their own
web ports share a small simulated programme; ``GET /patients/{id}/score`` asked
of either worker returns the patient's latest score as published on the scores
topic (the worker that does not own the patient's partition forwards the
request to the one that does), and 404 for a patient nobody has heard of.
Without a broker: the routing key and the 503 answers of a worker that owns
nothing yet."""

from __future__ import annotations

import asyncio
import json
import socket
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from types import SimpleNamespace

import pytest
from faust.web import View
from settling import poll
from yarl import URL

from cli.kafka_io import read_to_end, read_until
from cli.programme import build_programme
from cli.simulate import publish
from cli.worker_process import WorkerProcess
from streams.app import create_pipeline
from streams.partitioning import key_partition
from streams.score_lookup import FORWARDED_BY, SERVED_BY
from streams.settings import Settings
from streams.topics import ensure_topics

MEASURE = "resting_heart_rate"
PARTITIONS = 4
PATIENTS = 32
READINGS = 12


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def get(url: str) -> tuple[int, dict[str, str], bytes]:
    """Status, headers and body of a GET (error statuses included)."""
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def wait_until_both_own_partitions(
    workers: list[WorkerProcess], bases: list[str], run_id: str, timeout: float = 90.0
) -> None:
    """Ask both workers for patients that do not exist, one per partition,
    until every answer is a 404 from the partition's owner and both workers own
    some: the group has formed with both members (before that: connection
    refused, or 503 while nobody owns a partition or the group rebalances)."""
    probes, n = [], 0
    while len(probes) < PARTITIONS:  # an unknown id in each partition, in order
        candidate = f"nobody-{run_id}-{n}"
        if key_partition(candidate.encode(), PARTITIONS) == len(probes):
            probes.append(candidate)
        n += 1

    def ask() -> list:
        for worker in workers:
            assert worker.alive(), worker.log_tail()
        try:
            return [get(f"{base}/patients/{p}/score") for p in probes for base in bases]
        except OSError:  # a web server is not up yet
            return []

    def formed(answers) -> bool:
        return (
            bool(answers)
            and all(status == 404 for status, _, _ in answers)
            and {headers[SERVED_BY].rstrip("/") for _, headers, _ in answers} == set(bases)
        )

    answers = poll(ask, formed, timeout=timeout, interval=0.5)
    assert formed(answers), f"no group of two: {answers}"


def latest_scores(records, topic: str) -> dict[str, bytes]:
    latest = {}
    for record in sorted(records, key=lambda r: (r.partition, r.offset)):
        if record.topic == topic:
            latest[record.key.decode()] = record.value
    return latest


def test_unassigned_worker_answers_503_and_routes_by_the_tables_partitioner():
    settings = Settings(
        partitions=PARTITIONS, web_port=free_port(), web_bind="127.0.0.1", metrics_enabled=False
    )
    pipeline = create_pipeline(settings)
    lookup, app = pipeline.lookup, pipeline.app
    assert str(app.conf.canonical_url) == f"http://127.0.0.1:{settings.web_port}"
    for patient in (f"patient-{i:02d}" for i in range(20)):
        expected = key_partition(patient.encode(), PARTITIONS)
        assert lookup.partition_of(patient) == expected
        assert pipeline.patients.table.partition_for_key(patient) == expected

    async def ask(headers: dict[str, str]):
        request = SimpleNamespace(
            headers=headers, url=URL(f"{lookup.url}/patients/patient-00/score")
        )
        return await lookup.answer(View(app, app.web), request, "patient-00")

    partition = lookup.partition_of("patient-00")
    response = asyncio.run(ask({}))  # no assignment yet: nobody owns anything
    assert response.status == 503
    assert json.loads(response.body) == {
        "error": f"no worker owns partition {partition} yet",
        "status": 503,
        "partition": partition,
    }
    assert response.headers["Retry-After"] == "1"
    response = asyncio.run(ask({FORWARDED_BY: "http://127.0.0.1:1"}))  # never forwarded twice
    assert response.status == 503
    assert "does not own it" in json.loads(response.body)["error"]


@pytest.mark.kafka
def test_score_lookup_answers_from_either_worker(kafka_bootstrap, tmp_path):
    run_id = uuid.uuid4().hex[:8]
    prefix, app_id = f"lookup-{run_id}.", f"lookup-{run_id}"
    settings = Settings(
        bootstrap_servers=kafka_bootstrap, topic_prefix=prefix, partitions=PARTITIONS, app_id=app_id
    )  # fmt: skip
    programme = build_programme(
        [MEASURE], num_patients=PATIENTS, num_cohorts=3, obs_per_patient=READINGS, seed=31
    )
    patients = sorted(programme.truth.patients)
    posterior_topic, scores_topic = prefix + "population-posterior", prefix + "scores"

    def settled(records) -> bool:
        """The final posterior covers every reading, and every patient's latest
        score rests on all of their readings and on the latest posterior that
        asked for a republication."""
        posteriors = [json.loads(r.value) for r in records if r.topic == posterior_topic]
        if not posteriors:
            return False
        final = max(posteriors, key=lambda p: p["version"])
        if round(final["num_observations"]) != PATIENTS * READINGS:
            return False
        rescored = max(p["version"] for p in posteriors if p["rescore"])
        scores = latest_scores(records, scores_topic)
        return len(scores) == PATIENTS and all(
            m["count_exposed"] + m["count_unexposed"] == READINGS
            and m["population_version"] >= rescored
            for m in (json.loads(s)["measures"][0] for s in scores.values())
        )

    def progress(records) -> str:
        """What the run got to, for a failure message."""
        posteriors = [json.loads(r.value) for r in records if r.topic == posterior_topic]
        scores = [json.loads(s) for s in latest_scores(records, scores_topic).values()]
        counts = Counter(
            m["count_exposed"] + m["count_unexposed"] for s in scores for m in s["measures"]
        )
        return (
            f"posteriors (version, observations, rescore): "
            f"{[(p['version'], p['num_observations'], p['rescore']) for p in posteriors]}; "
            f"{len(scores)} patients scored, readings per latest score {dict(counts)}"
        )

    ports = [free_port(), free_port()]
    while ports[1] == ports[0]:
        ports[1] = free_port()
    bases = [f"http://127.0.0.1:{port}" for port in ports]
    workers = [
        WorkerProcess(
            {
                "EFFICACY_BOOTSTRAP_SERVERS": kafka_bootstrap,
                "EFFICACY_TOPIC_PREFIX": prefix,
                "EFFICACY_APP_ID": app_id,
                "EFFICACY_PARTITIONS": str(PARTITIONS),
                "EFFICACY_WEB_ENABLED": "true",
                "EFFICACY_WEB_PORT": str(port),
                "EFFICACY_WEB_BIND": "127.0.0.1",
                "EFFICACY_METRICS_PORT": "0",
                "EFFICACY_DATA_DIR": str(tmp_path / f"worker-{i}"),
            }
        )
        for i, port in enumerate(ports)
    ]
    started = time.monotonic()
    try:
        # The source topics exist with their partitions before the group forms.
        # Otherwise a member's metadata request creates them with the broker's
        # default count (aiokafka allows auto-creation; the local broker's default
        # is 1), racing the group's assignment. In one of six runs without this
        # the group formed while they were missing and nothing settled in 180 s
        # (most likely this race: no error in either worker's log).
        asyncio.run(ensure_topics(settings))
        for worker in workers:
            worker.start()
        wait_until_both_own_partitions(workers, bases, run_id)
        asyncio.run(publish(programme, settings))
        records = asyncio.run(
            read_until(kafka_bootstrap, [posterior_topic, scores_topic], settled, timeout=180)
        )
        assert settled(records), progress(records)
        settled_after = time.monotonic() - started

        # Every patient from both workers. A score may still be republished
        # after the check above (a last rescoring): compare with the topic's
        # latest again until they agree.
        def lookups():
            expected = latest_scores(
                asyncio.run(read_to_end(kafka_bootstrap, scores_topic)), scores_topic
            )
            answers = {(p, base): get(f"{base}/patients/{p}/score") for p in patients
                       for base in bases}  # fmt: skip
            wrong = [k for k, (status, _, body) in answers.items()
                     if status != 200 or json.loads(body) != json.loads(expected[k[0]])]  # fmt: skip
            return answers, wrong

        answers, wrong = poll(lookups, lambda result: not result[1], timeout=30, interval=2.0)
        if wrong:
            status, _, body = answers[wrong[0]]
            pytest.fail(f"{len(wrong)} wrong answers, e.g. {wrong[0]}: {status} {body[:300]!r}")
        for _, headers, _ in answers.values():
            assert headers["Content-Type"].startswith("application/json")

        # The partition owner answered every request: the same worker for both
        # asks, each worker owns some patients, and the other one forwarded.
        owners = {}
        for (patient, _), (_, headers, _) in answers.items():
            owners.setdefault(patient, set()).add(headers[SERVED_BY].rstrip("/"))
        assert all(len(served) == 1 for served in owners.values()), owners
        served_by = {next(iter(served)) for served in owners.values()}
        assert served_by == set(bases), served_by
        forwarded = sum(
            headers[SERVED_BY].rstrip("/") != base for (_, base), (_, headers, _) in answers.items()
        )
        assert forwarded == len(patients)  # one of the two asks per patient

        for base in bases:
            status, headers, body = get(f"{base}/patients/nobody-{run_id}/score")
            assert status == 404, body
            assert headers["Content-Type"].startswith("application/json")
            assert json.loads(body)["error"] == "unknown patient"
        print(
            f"settled {settled_after:.1f} s after the first worker started; "
            f"{len(answers)} lookups, {forwarded} forwarded"
        )
        for worker in workers:
            assert worker.alive(), worker.log_tail()
        logs = [worker.log_text() for worker in workers]
        for worker in workers:
            assert worker.stop() == 0, worker.log_tail()
        for log in logs:
            assert not [p for p in patients if p in log], "a patient id in an info-level log"
    finally:
        for worker in workers:
            worker.stop()
