"""Score lookup over HTTP on the real broker: two workers with their own web
ports share a small simulated programme, serving HTTPS (a certificate made for
the run with trustme) and requiring a bearer token (one worker reads it from
the environment, the other from a file); ``GET /patients/{id}/score`` asked of
either worker with the token returns the patient's latest score as published on
the scores topic (the worker that does not own the patient's partition forwards
the request, credential included, to the one that does), 404 for a patient
nobody has heard of, 401 without a token or with a wrong one; plain HTTP gets
no answer, faust's own table pages are off; every request is on the audit
topic, with the token's fingerprint and never the token. Without a broker: the
token check, the routing key, the 503 answers of a worker that owns nothing yet
and the 403 of a worker without a token."""

from __future__ import annotations

import asyncio
import hashlib
import http.client
import json
import socket
import ssl
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest
import trustme
from faust.web import View
from pydantic import ValidationError
from settling import poll
from test_worker_metrics import topic_config
from yarl import URL

from cli.kafka_io import read_to_end, read_until
from cli.programme import build_programme
from cli.simulate import publish
from cli.worker_process import WorkerProcess
from streams.app import create_pipeline
from streams.partitioning import key_partition
from streams.schemas import LookupAudit
from streams.score_lookup import FORWARDED_BY, SERVED_BY, LookupToken
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


@dataclass
class Client:
    """How the test asks: its Authorization header and TLS context."""

    token: str | None = None
    context: ssl.SSLContext | None = None
    headers: dict[str, str] = field(init=False)

    def __post_init__(self) -> None:
        self.headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}


def get(url: str, client: Client | None = None) -> tuple[int, dict[str, str], bytes]:
    """Status, headers and body of a GET (error statuses included)."""
    client = client or Client()
    request = urllib.request.Request(url, headers=client.headers)
    try:
        with urllib.request.urlopen(request, timeout=30, context=client.context) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def fingerprint(token: str) -> str:
    """The documented identity of a token in audit records (docs/pipeline.md)."""
    return "token:sha256:" + hashlib.sha256(token.encode()).hexdigest()[:16]


def test_the_token_check():
    token = LookupToken("s3cret-token-0123456789")
    assert token.check("Bearer s3cret-token-0123456789") == "allowed"
    assert token.check("bearer  s3cret-token-0123456789 ") == "allowed"
    assert token.check("Bearer s3cret-token-0123456788") == "wrong_credential"
    assert token.check("Bearer s3cret-token-01234567890") == "wrong_credential"
    assert token.check(None) == "no_credential"
    assert token.check("Bearer ") == "no_credential"
    assert token.check("Basic czNjcmV0LXRva2VuLTAxMjM0NTY3ODk=") == "no_credential"
    assert token.who == fingerprint("s3cret-token-0123456789")
    assert LookupToken(None).check("Bearer s3cret-token-0123456789") == "disabled"
    with pytest.raises(ValueError, match="at least 16"):
        LookupToken("short")


def test_the_token_comes_from_the_environment_or_a_file(tmp_path, monkeypatch):
    path = tmp_path / "token"
    path.write_text("from-a-file-0123456789\n")
    from_file = LookupToken.from_settings(Settings(lookup_token_file=path))
    assert from_file.check("Bearer from-a-file-0123456789") == "allowed"
    monkeypatch.setenv("EFFICACY_LOOKUP_TOKEN", "from-the-env-0123456789")
    settings = Settings()
    assert "from-the-env" not in repr(settings)  # a SecretStr
    assert LookupToken.from_settings(settings).check("Bearer from-the-env-0123456789") == "allowed"
    with pytest.raises(ValidationError, match="not both"):
        Settings(lookup_token_file=path)


def test_a_worker_without_a_token_refuses_every_lookup():
    pipeline = create_pipeline(Settings(partitions=PARTITIONS, metrics_enabled=False))
    lookup, app = pipeline.lookup, pipeline.app
    request = SimpleNamespace(
        headers={"Authorization": "Bearer anything-at-all-0123"},
        url=URL(f"{lookup.url}/patients/patient-00/score"),
        remote="127.0.0.1",
    )
    response = asyncio.run(lookup.handle(View(app, app.web), request, "patient-00"))
    assert response.status == 403
    assert "EFFICACY_LOOKUP_TOKEN" in json.loads(response.body)["error"]


def wait_until_both_own_partitions(
    workers: list[WorkerProcess],
    bases: list[str],
    run_id: str,
    client: Client,
    timeout: float = 90.0,
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
            return [get(f"{base}/patients/{p}/score", client) for p in probes for base in bases]
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
    bases = [f"https://127.0.0.1:{port}" for port in ports]
    # HTTPS with a certificate for 127.0.0.1 from a CA made for the run, and a
    # token: from the environment for one worker, from a file for the other.
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1")
    tls = {name: tmp_path / f"{name}.pem" for name in ("ca", "cert", "key")}
    ca.cert_pem.write_to_path(str(tls["ca"]))
    for i, blob in enumerate(server.cert_chain_pems):
        blob.write_to_path(str(tls["cert"]), append=i > 0)
    server.private_key_pem.write_to_path(str(tls["key"]))
    token = f"lookup-{uuid.uuid4().hex}"
    (tmp_path / "token").write_text(token + "\n")
    credentials = [
        {"EFFICACY_LOOKUP_TOKEN": token},
        {"EFFICACY_LOOKUP_TOKEN_FILE": str(tmp_path / "token")},
    ]
    context = ssl.create_default_context(cafile=str(tls["ca"]))
    client = Client(token, context)
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
                "EFFICACY_WEB_TLS_CERTFILE": str(tls["cert"]),
                "EFFICACY_WEB_TLS_KEYFILE": str(tls["key"]),
                "EFFICACY_WEB_TLS_CAFILE": str(tls["ca"]),
                "EFFICACY_METRICS_PORT": "0",
                "EFFICACY_DATA_DIR": str(tmp_path / f"worker-{i}"),
                **credentials[i],
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
        wait_until_both_own_partitions(workers, bases, run_id, client)
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
            answers = {(p, base): get(f"{base}/patients/{p}/score", client) for p in patients
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
            status, headers, body = get(f"{base}/patients/nobody-{run_id}/score", client)
            assert status == 404, body
            assert headers["Content-Type"].startswith("application/json")
            assert json.loads(body)["error"] == "unknown patient"
        print(
            f"settled {settled_after:.1f} s after the first worker started; "
            f"{len(answers)} lookups, {forwarded} forwarded"
        )
        # No credential, a wrong one, plain HTTP; faust's own table pages.
        refused = {"no_credential": Client(None, context), "wrong_credential": Client(
            f"lookup-{uuid.uuid4().hex}", context)}  # fmt: skip
        for base in bases:
            for outcome, asker in refused.items():
                status, headers, body = get(f"{base}/patients/{patients[0]}/score", asker)
                assert status == 401, (outcome, body)
                assert headers["WWW-Authenticate"].startswith("Bearer "), outcome
                assert ('error="invalid_token"' in headers["WWW-Authenticate"]) == (
                    outcome == "wrong_credential"
                )
                assert patients[0].encode() not in body
            with pytest.raises((OSError, http.client.HTTPException)):
                get(base.replace("https://", "http://") + f"/patients/{patients[0]}/score")
            status, _, _ = get(f"{base}/table/", client)
            assert status == 404

        # Every request is on the audit topic: who (the token's fingerprint), which
        # patient, the outcome; a forwarded lookup at both workers, one request id.
        audit_topic = prefix + "audit"
        wanted = {"no_credential": len(bases), "wrong_credential": len(bases)}

        def audited():
            raw = asyncio.run(read_to_end(kafka_bootstrap, audit_topic))
            audits = [LookupAudit.model_validate_json(r.value) for r in raw]
            return raw, [a.model_copy(update={name: getattr(a, name).rstrip("/")
                         for name in ("worker", "forwarded_by", "forwarded_to")
                         if getattr(a, name)}) for a in audits]  # fmt: skip

        def complete(result) -> bool:
            outcomes = Counter(a.outcome for a in result[1])
            return all(outcomes[o] >= n for o, n in wanted.items()) and all(
                any(a.patient_id == p and a.worker == base and a.status == 200
                    for a in result[1]) for p, base in answers)  # fmt: skip

        raw, audits = poll(audited, complete, timeout=30)
        assert complete((raw, audits)), Counter(a.outcome for a in audits)
        assert {r.key for r in raw if r.key is not None} <= {a.patient_id.encode() for a in audits}
        assert not [r for r in raw if token.encode() in r.value], "the token in an audit record"
        outcomes = Counter(a.outcome for a in audits)
        assert outcomes["disabled"] == 0
        assert {o: outcomes[o] for o in wanted} == wanted  # the refusals above, once each
        for a in audits:
            assert a.worker in bases
            if a.outcome == "allowed":
                assert a.who == fingerprint(token)
            else:
                assert (a.who, a.status, a.patient_id) == (None, 401, patients[0])
        for (patient, base), (_, headers, _) in answers.items():
            owner = headers[SERVED_BY].rstrip("/")
            entries = [a for a in audits if a.worker == base and a.patient_id == patient
                       and a.forwarded_by is None and a.status == 200]  # fmt: skip
            assert entries, (patient, base)
            if owner == base:
                assert all(a.forwarded_to is None for a in entries)
                continue
            assert all(a.forwarded_to == owner for a in entries), entries
            at_owner = {a.request_id for a in audits if a.worker == owner
                        and a.forwarded_by == base and a.patient_id == patient}  # fmt: skip
            assert {a.request_id for a in entries} <= at_owner
        config = asyncio.run(topic_config(kafka_bootstrap, audit_topic))
        assert config["retention.ms"] == "-1"

        for worker in workers:
            assert worker.alive(), worker.log_tail()
        logs = [worker.log_text() for worker in workers]
        for worker in workers:
            assert worker.stop() == 0, worker.log_tail()
        for log in logs:
            assert not [p for p in patients if p in log], "a patient id in an info-level log"
            assert token not in log
    finally:
        for worker in workers:
            worker.stop()
