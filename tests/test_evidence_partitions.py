"""A measure's population-evidence partition (streams.partitioning.
EvidencePartitions), without Kafka: the measures of a joint group share their
group's partition (so one worker owns every book the group's fit needs), every
other measure keeps its own, and every user of the partition agrees: the
patients step's EvidenceBatch messages, the population agent's table and its
ownership. The reference is zlib.crc32 computed here."""

from __future__ import annotations

import json
import zlib
from pathlib import Path
from types import SimpleNamespace

import faust
import pytest
from faust.types import TP
from prometheus_client import CollectorRegistry
from test_joint_stream import raw_records as joint_raw_records
from test_joint_stream import stream_programme

from cli.programme import build_programme
from monitoring.metrics import create_metrics
from streams.agents.population import PopulationService
from streams.app import measure_models
from streams.catalogue import Catalogue
from streams.chunked_consumer import ChunkRecord
from streams.partitioning import EvidencePartitions, key_partition
from streams.patient_step import StepContext, batch_keys, process_batch
from streams.posterior_feed import PosteriorBook
from streams.schemas import EvidenceBatch
from streams.settings import Settings
from streams.telemetry import Telemetry

SHIPPED = Path(__file__).parent.parent / "streams" / "measures.toml"
GROUPS = {
    "glycaemic": ("hba1c", "fasting_glucose"),
    "cardio": ("resting_heart_rate", "systolic_bp", "ldl_cholesterol"),
}
PARTITION_COUNTS = (1, 2, 3, 4, 6, 8, 12, 32)


def crc32_partition(name: str, partitions: int) -> int:
    return zlib.crc32(name.encode()) % partitions


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory) -> Catalogue:
    path = tmp_path_factory.mktemp("catalogue") / "measures.toml"
    groups = "".join(
        f"\n[joint.{name}]\nmeasures = {json.dumps(list(ms))}\n" for name, ms in GROUPS.items()
    )
    path.write_text(SHIPPED.read_text() + groups)
    return Catalogue.load(path)


def test_a_groups_measures_share_the_groups_partition_and_the_others_keep_their_own(catalogue):
    assert {g.name: g.measures for g in catalogue.joint} == GROUPS
    grouped = {m for ms in GROUPS.values() for m in ms}
    alone = set(catalogue.measures) - grouped
    assert alone  # the shipped catalogue has measures outside the groups
    split = set()
    for partitions in PARTITION_COUNTS:
        evidence = EvidencePartitions.of(catalogue, partitions)
        for group, measures in GROUPS.items():
            want = crc32_partition(f"joint:{group}", partitions)
            assert [evidence(m) for m in measures] == [want] * len(measures), (group, partitions)
            if len({crc32_partition(m, partitions) for m in measures}) > 1:
                split.add((group, partitions))
        for measure in alone:
            assert evidence(measure) == crc32_partition(measure, partitions), (measure, partitions)
        # A measure the catalogue does not know (a table key of a removed measure).
        assert evidence("retired_measure") == crc32_partition("retired_measure", partitions)
    # The groups' own measures would partition apart: the test tells the rules apart.
    assert ("glycaemic", 6) in split and ("cardio", 4) in split


def test_the_patients_step_sends_evidence_on_the_co_partitioned_partition(catalogue):
    """Raw records of both glycaemic measures and of an ungrouped one through
    process_batch: every EvidenceBatch goes to its measure's evidence
    partition, the group's for hba1c and fasting glucose."""
    partitions = 6
    settings = Settings(max_age_days=36500.0, partitions=partitions)
    models = measure_models(catalogue, settings)
    context = StepContext(catalogue, models, PosteriorBook(), settings)
    origin = settings.time_origin
    events, patients = stream_programme(origin)
    raw = [
        ChunkRecord(key, value, topic, key_partition(key, partitions), k, None)
        for k, (topic, key, value) in enumerate(
            joint_raw_records(events, patients, origin, settings.topic_prefix)
        )
    ]
    alone = "phq9"
    programme = build_programme([alone], num_patients=10, num_cohorts=2, obs_per_patient=4, seed=3)
    raw += programme.as_read(settings.topic_prefix, partitions)
    _, outputs = process_batch(dict.fromkeys(batch_keys(raw)), raw, context)
    assert not outputs.dead_letters
    sent: dict[str, set[int]] = {}
    for message in outputs.evidence:
        batch = EvidenceBatch.model_validate_json(message.value)
        assert message.key == batch.measure.encode()
        sent.setdefault(batch.measure, set()).add(message.partition)
    glycaemic = crc32_partition("joint:glycaemic", partitions)
    assert sent == {
        "hba1c": {glycaemic},
        "fasting_glucose": {glycaemic},
        alone: {crc32_partition(alone, partitions)},
    }
    # What the old rule (each measure its own crc32) would have split.
    assert crc32_partition("hba1c", partitions) != crc32_partition("fasting_glucose", partitions)


def test_the_population_table_and_ownership_follow_the_evidence_partition(catalogue):
    partitions = 6
    settings = Settings(partitions=partitions)
    app = faust.App("evidence-partitions-test", broker="kafka://127.0.0.1:9", web_enabled=False)
    evidence_topic = SimpleNamespace(get_topic_name=lambda: "population-evidence")
    service = PopulationService(
        app,
        SimpleNamespace(population_evidence=evidence_topic),  # type: ignore[arg-type]
        measure_models(catalogue, settings),
        PosteriorBook(),
        settings,
        Telemetry(create_metrics(CollectorRegistry())),
        catalogue=catalogue,
    )
    glycaemic = crc32_partition("joint:glycaemic", partitions)
    for measure in ("hba1c", "fasting_glucose"):
        assert service.table.partition_for_key(f"{measure}/p-1") == glycaemic
    assert service.table.partition_for_key("phq9/p-1") == crc32_partition("phq9", partitions)
    actives = {TP("population-evidence", glycaemic)}
    app.assignor.assigned_actives = lambda: actives  # type: ignore[method-assign]
    assert service.owns("hba1c") and service.owns("fasting_glucose")
    assert service.owns("phq9") == (crc32_partition("phq9", partitions) == glycaemic)
