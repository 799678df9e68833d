"""A joint group whose measures would partition to different workers is fitted
(streams.partitioning.EvidencePartitions), on the real broker.

Two worker subprocesses, two partitions: faust gives each worker one
partition of every topic. The catalogue is the shipped one with fasting
glucose renamed ``glucose`` and the joint group ``glycaemic`` of hba1c and
glucose: crc32("hba1c") and crc32("glucose") are of different parity, so by
their own names the two measures' evidence would be owned by different workers
and the group never fitted. The simulated programme of tests/test_joint_e2e.py
(24 patients, both measures) is produced; the group's JointPosterior must be
published, covering every reading, and every patient's latest score must
carry the group's joint score under it.
"""

from __future__ import annotations

import asyncio
import zlib

import pytest
from e2e_setup import JointSettling, catalogue_run, start_in_turn
from test_families_e2e import send
from test_joint_stream import PATIENTS, SHIPPED, raw_records, stream_programme

from cli.kafka_io import read_until
from cli.worker_process import WorkerProcess
from streams.partitioning import EvidencePartitions

pytestmark = pytest.mark.kafka

PARTITIONS = 2
MEASURES = ("hba1c", "glucose")
GROUP = '\n[joint.glycaemic]\nmeasures = ["hba1c", "glucose"]\n'


def test_a_joint_group_split_by_its_measures_names_is_fitted_by_two_workers(
    kafka_bootstrap, tmp_path
):
    own = [zlib.crc32(m.encode()) % PARTITIONS for m in MEASURES]
    assert own[0] != own[1]  # by their own names, on different partitions
    text = SHIPPED.read_text().replace("[fasting_glucose]", "[glucose]") + GROUP
    catalogue, _, prefix, env, settings = catalogue_run(
        kafka_bootstrap, tmp_path, text, "colocate", partitions=PARTITIONS
    )
    evidence = EvidencePartitions.of(catalogue, PARTITIONS)
    assert evidence("hba1c") == evidence("glucose")
    events, patients = stream_programme(settings.time_origin)
    sends = raw_records(events, patients, settings.time_origin, prefix, measures=MEASURES)
    settling = JointSettling(prefix, patients, [e.patient.size for e in events], "glycaemic")

    workers = [WorkerProcess({**env, "EFFICACY_DATA_DIR": str(tmp_path / name)}) for name in "ab"]
    first, second = workers
    try:
        start_in_turn(first, second)  # both hold partitions before the first record
        # One population-evidence partition each: the measures' own partitions
        # would be on different workers.
        owned = [w.assigned(prefix + "population-evidence") for w in workers]
        print(f"population-evidence partitions: {owned}")
        assert sorted(owned) == ["{0}", "{1}"], owned
        asyncio.run(send(settings, sends))
        found = asyncio.run(
            read_until(kafka_bootstrap, settling.topics, settling.settled, timeout=420)
        )
        logs = [w.log_tail(40) for w in workers]
        for worker in workers:
            assert worker.alive(), worker.log_tail()
    finally:
        codes = [w.stop() for w in workers]
    assert codes == [0, 0], [w.log_tail() for w in workers]
    assert settling.settled(found), logs
    posterior = settling.final(found)
    assert posterior.measures == list(MEASURES)
    assert posterior.num_patients == PATIENTS
