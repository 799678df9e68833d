"""A real Prometheus scrapes a running worker during a simulated run (issue 5).

The worker serves /metrics on its configured port; Prometheus (Debian's package,
on loopback, the repo's scrape config and rules) scrapes it every second while a
programme with bad and duplicate records streams through. Checked against the
programme's ground truth: the counters Prometheus holds at the end, the
population gauges, that no series carries a patient id, and that the dashboards'
queries return series from a real worker. The worker also runs the periodic
structure selection (a short interval, 3 folds): its records on the compacted
structure-selection topic and its gauges.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections import Counter
from datetime import timedelta

import pytest
from monitoring_files import (
    DASHBOARDS,
    concrete,
    dashboard_exprs,
    load_dashboard,
    query,
    running_prometheus,
)
from monitoring_files import free_port as free_tcp_port
from settling import poll

from cli.kafka_io import produce, read_until
from cli.programme import SIMULATED_COVARIATES, build_programme
from cli.simulate import publish
from cli.worker_process import WorkerProcess
from streams.catalogue import DEFAULT_CATALOGUE, Catalogue
from streams.kafka_options import aiokafka_options
from streams.patient_step import STAGES
from streams.schemas import StructureSelection
from streams.settings import Settings

pytestmark = pytest.mark.kafka
MEASURES = ["resting_heart_rate", "hba1c"]
PATIENTS = 60

# Series a stationary, healthy run cannot have: nothing drifted. The run ends
# with readings shifted far from their predictive, after which every dashboard
# query, drift alerts included, must return series.
ONLY_AFTER_DRIFT = ("efficacy_drift_alerts_total",)
SHIFT = 25.0  # bpm: ~6 residual sds of resting heart rate


def shifted_readings(programme, measure: str, per_patient: int = 4):
    """Each patient's last valid reading of ``measure`` re-sent ``per_patient``
    times, hours later and SHIFT canonical units higher (new event ids): readings
    that conflict with the posterior predictive, as a broken device would send."""
    last = {}
    for record in programme.send_order():
        if record.label == "valid" and record.measure == measure:
            last[record.patient_id] = record
    records = []
    for record in last.values():
        raw = json.loads(record.value)
        per_unit = raw["value"] / record.canonical_value  # raw units per canonical unit
        for k in range(per_patient):
            moved = dict(
                raw,
                event_id=f"{raw['event_id']}-shifted-{k}",
                event_time=(record.event_time + timedelta(hours=k + 1)).isoformat(),
                value=raw["value"] + SHIFT * per_unit,
            )
            records.append((record.topic, record.key, json.dumps(moved).encode()))
    return records


def value(base: str, expr: str) -> float:
    result = query(base, expr)["data"]["result"]
    assert result, f"no series for {expr}"
    return sum(float(r["value"][1]) for r in result)


def values(base: str, exprs: list[str]) -> list[float | None]:
    """The value of each query (None: no series yet)."""
    results = [query(base, expr)["data"]["result"] for expr in exprs]
    return [sum(float(r["value"][1]) for r in rs) if rs else None for rs in results]


def test_prometheus_scrapes_a_running_worker(kafka_bootstrap, tmp_path):
    run_id = uuid.uuid4().hex[:8]
    prefix = f"metrics-{run_id}."
    port = free_tcp_port()
    catalogue_file = tmp_path / "measures.toml"
    catalogue_file.write_text(DEFAULT_CATALOGUE.read_text() + SIMULATED_COVARIATES)
    env = {
        "EFFICACY_BOOTSTRAP_SERVERS": kafka_bootstrap,
        "EFFICACY_TOPIC_PREFIX": prefix,
        "EFFICACY_APP_ID": f"metrics-{run_id}",
        "EFFICACY_PARTITIONS": "2",
        "EFFICACY_WEB_ENABLED": "false",
        "EFFICACY_METRICS_PORT": str(port),
        "EFFICACY_DATA_DIR": str(tmp_path / "faust"),
        "EFFICACY_SELECTION_INTERVAL_SECONDS": "20",
        "EFFICACY_SELECTION_FOLDS": "3",
        # Covariates declared and sent, so the effect-modifier panels have series.
        "EFFICACY_MEASURES_FILE": str(catalogue_file),
    }
    settings = Settings(bootstrap_servers=kafka_bootstrap, topic_prefix=prefix, partitions=2)
    programme = build_programme(
        MEASURES, catalogue=Catalogue.load(catalogue_file), num_patients=PATIENTS, num_cohorts=3,
        obs_per_patient=12, seed=31, bad_fraction=0.03, duplicate_fraction=0.03,
        spec_overrides={measure: {"with_covariates": True} for measure in MEASURES},
    )  # fmt: skip
    truth = programme.truth

    def settled(records) -> bool:
        posteriors = {}
        for r in records:
            if r.topic == prefix + "population-posterior":
                message = json.loads(r.value)
                posteriors[message["measure"]] = message["num_observations"]
        scores = {r.key for r in records if r.topic == prefix + "scores"}
        return (
            len(scores) == PATIENTS
            and set(posteriors) == set(MEASURES)
            and round(sum(posteriors.values())) == truth.valid_unique_readings
        )

    with WorkerProcess(env) as worker, running_prometheus([f"127.0.0.1:{port}"], tmp_path) as base:
        asyncio.run(publish(programme, settings))
        records = asyncio.run(
            read_until(
                kafka_bootstrap,
                [prefix + "population-posterior", prefix + "scores"],
                done=settled,
                timeout=400,
            )
        )
        assert settled(records), worker.log_tail()

        def selected(records) -> bool:
            return {json.loads(r.value)["measure"] for r in records} == set(MEASURES)

        topic = prefix + "structure-selection"
        records = asyncio.run(read_until(kafka_bootstrap, [topic], done=selected, timeout=300))
        assert selected(records), worker.log_tail()
        for compacted in (topic, prefix + "scores"):
            config = asyncio.run(topic_config(kafka_bootstrap, compacted))
            assert config["cleanup.policy"] == "compact", compacted
        for record in records:
            selection = StructureSelection.model_validate_json(record.value)
            assert record.key == selection.measure.encode()
            assert selection.current_structure == "partial+cohort"
            structures = {row.structure for row in selection.structures}
            assert structures == {
                "complete", "none", "partial", "partial+cohort",
                "partial+x:age+x:group", "partial+x:age", "partial+x:group",
            }  # fmt: skip
            assert selection.choice in structures and selection.posterior_version >= 1
            assert selection.num_folds == 3 and selection.num_cohorts == 3
        # ingest accepts duplicates (they are recognised downstream, by patient)
        expected_accepted = (
            truth.enrollment_events + truth.valid_unique_readings + len(truth.duplicates)
        )
        reasons = Counter(b.reason for b in truth.bad_records)
        reasons["duplicate"] += len(truth.duplicates)
        # Prometheus holds the final counts once a scrape after the last update
        # happened: poll the exact values (asserted one by one below).
        # The selection gauges are set as the selection record is sent: the record
        # read above can reach the test before a scrape sees them.
        exprs = [
            "efficacy_events_accepted_total",
            "efficacy_patients_tracked",
            *(f'sum(efficacy_events_dead_lettered_total{{reason="{r}"}})' for r in reasons),
            *(f'sum(efficacy_selection_chosen{{measure="{m}"}})' for m in MEASURES),
        ]
        expected = [expected_accepted, PATIENTS, *reasons.values(), *(1.0 for _ in MEASURES)]
        scraped = poll(lambda: values(base, exprs), lambda v: v == expected, timeout=60)
        print(f"scraped {dict(zip(exprs, scraped, strict=True))}")

        assert value(base, 'up{job="efficacy-worker"}') == 1
        accepted = value(base, "efficacy_events_accepted_total")
        assert accepted == expected_accepted
        for reason, count in reasons.items():
            got = value(base, f'sum(efficacy_events_dead_lettered_total{{reason="{reason}"}})')
            assert got == count, reason
        assert value(base, "efficacy_patients_tracked") == PATIENTS
        for measure in MEASURES:
            effect = truth.measures[measure].population_effect
            low = value(base, f'efficacy_population_effect_q05{{measure="{measure}"}}')
            high = value(base, f'efficacy_population_effect_q95{{measure="{measure}"}}')
            width = high - low
            assert low - width <= effect <= high + width, (measure, low, high, effect)
            calls = value(base, f'sum(efficacy_patients{{measure="{measure}"}})')
            assert calls == PATIENTS
        assert value(base, "sum(efficacy_scores_published_total)") >= PATIENTS
        # every patient's record is kept parsed (far below the default 1 GB) and
        # looked up again by later batches and the rescoring after each posterior
        hits = poll(
            lambda: values(base, ['efficacy_state_cache_lookups_total{result="hit"}'])[0] or 0.0,
            lambda v: v >= PATIENTS,
            timeout=30,
        )
        assert hits >= PATIENTS, hits
        assert value(base, "efficacy_state_cache_bytes") > 0
        # the event loop's CPU in the patients agent's steps, every stage of them
        for stage in STAGES:
            assert value(base, f'efficacy_step_cpu_seconds_total{{stage="{stage}"}}') > 0, stage
        for measure in MEASURES:
            assert value(base, f'sum(efficacy_selection_chosen{{measure="{measure}"}})') == 1
            diffs = query(base, f'efficacy_selection_elpd_diff{{measure="{measure}"}}')
            assert len(diffs["data"]["result"]) == 7  # 4 pooling + 3 covariate structures
            assert max(float(r["value"][1]) for r in diffs["data"]["result"]) == 0.0
            assert value(base, f'efficacy_selection_seconds_count{{measure="{measure}"}}') >= 1

        # No series of the worker's carries a patient id in any label.
        series = query(base, '{job="efficacy-worker"}')["data"]["result"]
        labels = {v for s in series for v in s["metric"].values()}
        patients = set(truth.patients)
        assert not labels & patients
        assert not any(p in v for v in labels for p in patients)

        # A broken device: readings far above their predictive raise a prior-data
        # conflict alert (no patient named), and its series reaches Prometheus.
        shifted = shifted_readings(programme, "resting_heart_rate")
        for topic in {t for t, _, _ in shifted}:
            asyncio.run(
                produce(
                    kafka_bootstrap,
                    settings.topic(topic),
                    [(k, v) for t, k, v in shifted if t == topic],
                )
            )
        alerts = asyncio.run(
            read_until(
                kafka_bootstrap,
                [prefix + "alerts"],
                done=lambda rs: any(b"prior_data_conflict" in r.value for r in rs),
                timeout=120,
            )
        )
        conflicts = [json.loads(r.value) for r in alerts if b"prior_data_conflict" in r.value]
        assert conflicts, worker.log_tail()
        assert conflicts[0]["measure"] == "resting_heart_rate"
        assert conflicts[0]["patient_id"] is None
        assert conflicts[0]["statistics"]["direction"] == 1.0  # readings run above
        kind = 'efficacy_drift_alerts_total{kind="prior_data_conflict"}'
        poll(lambda: values(base, [f"sum({kind})"])[0] or 0, lambda n: n >= 1, timeout=60)
        assert value(base, f"sum({kind})") >= 1
        assert value(base, 'efficacy_drift_conflict_statistic{measure="resting_heart_rate"}') >= 0
        assert value(base, "count(efficacy_drift_window_shift_sd_units)") == len(MEASURES)

        empty = []
        for path in DASHBOARDS:
            for expr in dashboard_exprs(load_dashboard(path)):
                answer = query(base, concrete(expr))
                assert answer["status"] == "success", f"{expr!r}: {answer.get('error')}"
                if not answer["data"]["result"] and not any(m in expr for m in ONLY_AFTER_DRIFT):
                    empty.append(f"{path.stem}: {expr}")
        assert not empty, "dashboard queries with no series from a real worker:\n" + "\n".join(
            empty
        )
        assert worker.stop() == 0, worker.log_tail()


async def topic_config(bootstrap: str, topic: str) -> dict[str, str]:
    """The broker's configuration of ``topic``."""
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

    admin = AIOKafkaAdminClient(**aiokafka_options(bootstrap))
    await admin.start()
    try:
        [response] = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topic)])
    finally:
        await admin.close()
    [(_code, _message, _type, _name, entries)] = response.resources
    return {entry[0]: entry[1] for entry in entries}
