"""No patient id in the worker's logs or metrics: a whole programme through a real
worker on the real broker.

A crossover programme with bad and duplicate records (tests/test_reliability.py's
``small_programme``) runs through one worker at log level INFO until it has
settled (tests/settling.py), with score lookups on the way (allowed, refused, an
unknown id). Then every label value of the worker's own /metrics endpoint
(scraped over HTTP: the pipeline's metrics and faust's sensor) and every line of
its log (INFO and above, tracebacks included) is searched for the programme's
patient ids. The data topics keep them (scores, dead letters, alerts and audit
are keyed or filled by patient, protected by ACLs): the test checks that the ids
it searches for are there, so the search is not vacuous.
"""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
import uuid

import pytest
from monitoring_files import free_port
from prometheus_client.parser import text_string_to_metric_families
from settling import poll
from test_reliability import Run, small_programme, wait_settled

from cli.kafka_io import read_to_end
from cli.simulate import publish
from cli.worker_process import WorkerProcess

pytestmark = pytest.mark.kafka


def label_values(exposition: str) -> set[str]:
    """Every label value of a Prometheus text exposition."""
    return {
        value
        for family in text_string_to_metric_families(exposition)
        for sample in family.samples
        for value in sample.labels.values()
    }


def naming(lines: list[str], patients: set[str]) -> list[str]:
    """The lines that contain a patient id."""
    return [line for line in lines if any(patient in line for patient in patients)]


def lookup(url: str, token: str | None) -> int:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=30):
            return 200
    except urllib.error.HTTPError as error:
        return error.code


def test_a_programme_leaves_no_patient_id_in_logs_or_metrics(kafka_bootstrap, tmp_path):
    run = Run(kafka_bootstrap, "noids", small_programme(seed=23, patients=60))
    patients = set(run.truth.patients)
    metrics_port, web_port = free_port(), free_port()
    token = f"noids-{uuid.uuid4().hex}"
    env = run.env(
        tmp_path / "worker",
        EFFICACY_METRICS_PORT=str(metrics_port),
        EFFICACY_WEB_ENABLED="true",
        EFFICACY_WEB_PORT=str(web_port),
        EFFICACY_WEB_BIND="127.0.0.1",
        EFFICACY_LOOKUP_TOKEN=token,
    )
    with WorkerProcess(env, loglevel="info") as worker:
        asyncio.run(publish(run.programme, run.settings))
        wait_settled(run, timeout=420)
        base = f"http://127.0.0.1:{web_port}/patients"
        asked = sorted(patients)[:5]
        statuses = [lookup(f"{base}/{patient}/score", token) for patient in asked]
        statuses += [
            lookup(f"{base}/{asked[0]}/score", None),
            lookup(f"{base}/nobody/score", token),
        ]
        assert statuses == [200] * len(asked) + [401, 404]
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=30) as r:
            exposition = r.read().decode()
        assert worker.stop() == 0, worker.log_tail()
        log = worker.log_text()

    # The ids are in the data topics: what the search below looks for is real.
    scores = asyncio.run(read_to_end(kafka_bootstrap, run.prefix + "scores"))
    assert {r.key.decode() for r in scores} == patients
    dead = asyncio.run(read_to_end(kafka_bootstrap, run.prefix + "deadletter"))
    assert {r.key.decode(errors="replace") for r in dead if r.key} & patients

    def audited():
        records = asyncio.run(read_to_end(kafka_bootstrap, run.prefix + "audit"))
        return [json.loads(r.value)["patient_id"] for r in records]

    assert set(asked) <= set(poll(audited, lambda ids: set(asked) <= set(ids), timeout=30))

    # Metrics: series from both the pipeline and faust's sensor, no id in a label.
    values = label_values(exposition)
    assert {"wearables", "enrollments"} <= values  # the source label, for one
    assert any(name.startswith("faust_") for name in exposition.split())
    assert not naming(sorted(values), patients), "a patient id in a metric label"

    # The log: at INFO, and it says something (faust's start, our own lines).
    lines = log.splitlines()
    assert any("[^Worker]: Ready" in line for line in lines), log[-2000:]
    assert not any(" DEBUG" in line or "[DEBUG]" in line for line in lines)
    leaked = naming(lines, patients)
    assert not leaked, f"{len(leaked)} log lines name a patient, e.g. {leaked[:3]}"
