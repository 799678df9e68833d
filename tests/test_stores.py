"""The patients and population tables on the RocksDB store: every key lives in
its own partition's database, whatever event (of whatever partition) is being
processed, and the tables can be written outside of any stream (the rescoring
task). faust's stock RocksDB store puts a key in the current event's partition
and asserts there is one; both tests fail with it."""

from __future__ import annotations

import asyncio
import weakref
from types import SimpleNamespace

import pytest
from faust.streams import _current_event

from streams.app import create_pipeline
from streams.partitioning import key_partition, measure_partition
from streams.settings import Settings
from streams.stores import KeyPartitionedRocksDB

PARTITIONS = 4


@pytest.fixture()
def pipeline(tmp_path):
    # faust's table writes outside a stream need the thread's current event loop;
    # an earlier test's asyncio.run() leaves none set.
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    settings = Settings(
        store_url="rocksdb://",
        data_dir=tmp_path,
        partitions=PARTITIONS,
        web_enabled=False,
        metrics_enabled=False,
        compilation_cache_dir=None,
    )
    yield create_pipeline(settings)
    asyncio.set_event_loop(None)
    loop.close()


class _Event:
    """What the stores read of faust's current event: its message's partition."""

    def __init__(self, partition: int) -> None:
        self.message = SimpleNamespace(partition=partition)


def _event_of_partition(partition: int) -> _Event:
    return _Event(partition)


def _database_of(store, key: str) -> int:
    """The partition whose database holds ``key`` (read from every database)."""
    stored = store._encode_key(key)
    found = [p for p, db in store._dbs.items() if db.get(stored) is not None]
    assert len(found) == 1, found
    return found[0]


def test_patients_table_keeps_each_key_in_its_partition(pipeline):
    table = pipeline.patients.table
    store = table.data
    assert isinstance(store, KeyPartitionedRocksDB)
    ids = [f"patient-{i}" for i in range(40)]
    # Written outside of any stream (as the rescoring task does): no current event.
    for patient_id in ids[:20]:
        table[patient_id] = patient_id.encode()
    # Written while an event of partition 0 is current (the last event of a batch
    # mixing partitions): each key still goes to its own partition.
    event = _event_of_partition(0)
    token = _current_event.set(weakref.ref(event))
    try:
        for patient_id in ids[20:]:
            table[patient_id] = patient_id.encode()
        for patient_id in ids:  # and reads find every key, from every partition
            assert table.get(patient_id) == patient_id.encode()
    finally:
        _current_event.reset(token)
    partitions = {key_partition(p.encode(), PARTITIONS) for p in ids}
    assert partitions == set(range(PARTITIONS))  # the keys cover every partition
    for patient_id in ids:
        assert _database_of(store, patient_id) == key_partition(patient_id.encode(), PARTITIONS)


def test_population_table_keeps_each_key_in_its_measures_partition(pipeline):
    table = pipeline.population.table
    store = table.data
    assert isinstance(store, KeyPartitionedRocksDB)
    measures = ["resting_heart_rate", "hba1c", "phq9"]
    event = _event_of_partition(3)
    token = _current_event.set(weakref.ref(event))
    try:
        for measure in measures:
            for i in range(5):
                table[f"{measure}/p{i}"] = b"{}"
    finally:
        _current_event.reset(token)
    for measure in measures:
        for i in range(5):
            key = f"{measure}/p{i}"
            assert _database_of(store, key) == measure_partition(measure, PARTITIONS)
            assert table.get(key) == b"{}"
