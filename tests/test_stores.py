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
from faust.types import TP

from streams.app import create_pipeline
from streams.catalogue import Catalogue
from streams.chunked_consumer import Chunk
from streams.output import SentBatch
from streams.partitioning import EvidencePartitions, key_partition
from streams.settings import Settings
from streams.stores import KeyCounts, KeyPartitionedRocksDB

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
    evidence_partition = EvidencePartitions.of(Catalogue.load(), PARTITIONS)
    for measure in measures:
        for i in range(5):
            key = f"{measure}/p{i}"
            assert _database_of(store, key) == evidence_partition(measure)
            assert table.get(key) == b"{}"


@pytest.fixture
def own_loop():
    """A new event loop, the current one for the test (faust's app needs one)."""
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    yield loop
    asyncio.set_event_loop(None)
    loop.close()


def _pipeline(tmp_path, store_url: str):
    """A pipeline whose tables use ``store_url`` in ``tmp_path``, no web, no metrics."""
    settings = Settings(
        store_url=store_url, data_dir=tmp_path, partitions=PARTITIONS, web_enabled=False,
        metrics_enabled=False, compilation_cache_dir=None,
    )  # fmt: skip
    return create_pipeline(settings)


@pytest.mark.parametrize("store_url", ["rocksdb://", "memory://"])
def test_prefix_values_read_one_measures_evidence_and_nothing_else(tmp_path, store_url, own_loop):
    """The population book's rebuild reads a measure's values by a seek to its
    prefix in its partition's database: the same values as filtering every key,
    also for measures that share a partition or whose names extend another's."""
    table = _pipeline(tmp_path, store_url).population.table
    measures = ["hba1c", "hba1c_2", "phq9", "resting_heart_rate", "daily_steps", "ldl"]
    partition_of = table.evidence
    written = {}
    for m, measure in enumerate(measures):
        for i in range(30 + m):
            key, value = f"{measure}/p{i}", f"{measure}:{i}".encode()
            table[key] = value
            written[key] = value
    shared = [m for m in measures if partition_of(m) == partition_of("hba1c")]
    assert len(shared) >= 2  # measures sharing a partition are kept apart by the prefix
    for measure in measures:
        expected = sorted(v for k, v in written.items() if k.startswith(f"{measure}/"))
        found = sorted(table.prefix_values(partition_of(measure), f"{measure}/"))
        assert found == expected, measure


class _SendLog:
    """A producer that records what it is handed, in order, and yields to the
    loop at every send (as aiokafka's send may, when it waits for a batch)."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes | None, bytes | None]] = []

    async def send_many(self, records) -> list[SentBatch]:
        batches = []
        for topic, key, value, partition in records:
            await asyncio.sleep(0)
            self.sent.append((topic, key, value))
            future = asyncio.get_running_loop().create_future()
            batches.append(SentBatch(topic, partition or 0, 1, future))
        return batches


@pytest.mark.parametrize("store_url", ["rocksdb://", "memory://"])
def test_write_many_and_values_of_are_fausts_own_table_path(tmp_path, store_url, own_loop):
    """write_many and values_of serialise keys themselves and go to the store
    directly: what they write is what faust's table reads (``table.get``),
    what they read is what faust's table writes (``table[key] = value``), and
    each changelog record is keyed and valued as faust's own path would
    (``prepare_key``/``prepare_value``), for plain keys and for keys that JSON
    escapes (quotes, backslashes, control characters, non-ASCII)."""
    table = _pipeline(tmp_path, store_url).patients.table
    keys = [
        "patient-1",
        "p 2:x/y",
        'quote"d',
        "back\\slash",
        "tab\tkey",
        "caf\u00e9",
        "\u6f22\u5b57",
    ]
    keys += [f"patient-{i}" for i in range(2, 40)]
    written = {key: f'{{"k":{i}}}'.encode() for i, key in enumerate(keys)}
    producer = _SendLog()
    own_loop.run_until_complete(table.write_many(written, producer))
    assert {key: table.get(key) for key in keys} == written  # faust reads what was written
    topic = table.changelog_topic
    expected = [
        (
            topic.get_topic_name(),
            topic.prepare_key(key, table.key_serializer)[0],
            topic.prepare_value(value, table.value_serializer)[0],
        )
        for key, value in written.items()
    ]
    assert sorted(producer.sent) == sorted(expected)
    if store_url.startswith("rocksdb"):
        assert all(_database_of(table.data, key) == table.partition_for_key(key) for key in keys)

    faust_written = {f"faust-{key}": f"v{i}".encode() for i, key in enumerate(keys)}
    for key, value in faust_written.items():
        table[key] = value
    wanted = [*faust_written, *keys, "never-written"]
    assert table.values_of(wanted) == {**faust_written, **written, "never-written": None}


def test_the_records_a_write_caused_never_overtake_an_earlier_writers(pipeline):
    """The rescoring task saves patient 29 and sends its scores; a batch then saves
    patient 30 and sends its score. The patient's last score on the topic must
    be the batch's: the scores and changelog records of one write go out
    before any of the next's, in the order the values were set."""
    table = pipeline.patients.table
    producer = _SendLog()
    # patient-0 last: its score is the last the rescoring task sends.
    rescored = {f"patient-{i}": b"29" for i in (4, 3, 2, 1, 0)}
    rescored_scores = [("scores", key.encode(), b"score-29", None) for key in rescored]

    async def race() -> None:
        rescoring = asyncio.create_task(table.write_many(rescored, producer, rescored_scores))
        await asyncio.sleep(0)  # the rescoring task holds the send order
        batch = table.write_many(
            {"patient-0": b"30"}, producer, [("scores", b"patient-0", b"score-30", None)]
        )
        await asyncio.gather(rescoring, batch)

    asyncio.get_event_loop().run_until_complete(race())
    assert table.get("patient-0") == b"30"
    changelog = table.changelog_topic.get_topic_name()
    of_patient_0 = [(topic, value) for topic, key, value in producer.sent
                    if key in (b"patient-0", b'"patient-0"')]  # fmt: skip
    assert of_patient_0 == [
        (changelog, b"29"),
        ("scores", b"score-29"),
        (changelog, b"30"),
        ("scores", b"score-30"),
    ]
    assert len(producer.sent) == 2 * len(rescored) + 2


def test_rescoring_waits_while_the_population_agent_takes_over_measures(pipeline):
    """While the population agent rebuilds and fits measures it newly owns (a
    start, a rebalance), rescoring waits its turn: the fits come first."""
    patients, population = pipeline.patients, pipeline.population

    async def scenario() -> tuple[bool, bool]:
        population._taking_over = True
        waiting = asyncio.create_task(patients.turn_to_rescore())
        await asyncio.sleep(0.3)
        waited = not waiting.done()
        population._taking_over = False
        await asyncio.wait_for(waiting, timeout=5)
        return waited, waiting.done()

    waited, went_on = asyncio.get_event_loop().run_until_complete(scenario())
    assert waited and went_on


@pytest.mark.parametrize("store_url", ["rocksdb://", "memory://"])
def test_partition_keys_and_key_counts_list_each_partition_exactly(tmp_path, store_url, own_loop):
    """partition_keys lists the keys of one partition and nothing else, under a
    snapshot on RocksDB (a key set while the listing is under way is not in
    it); KeyCounts counts each partition once through it and then adds the
    new keys it is told of, which is len(table) by partition, never off by
    a key set during a count."""
    table = _pipeline(tmp_path, store_url).patients.table
    written = [f"patient-{i}" for i in range(200)]
    for key in written:
        table[key] = b"{}"
    by_partition = {
        p: sorted(k for k in written if table.partition_for_key(k) == p) for p in range(PARTITIONS)
    }
    assert all(by_partition.values())
    for partition, expected in by_partition.items():
        assert sorted(table.partition_keys(partition)) == expected

    counts = KeyCounts(table.partition_for_key)
    late = [f"late-{i}" for i in range(40)]

    async def count_while_writing() -> None:
        counting = asyncio.create_task(counts.count(table, range(PARTITIONS), chunk=7))
        for key in late:  # new keys, as the agent sets them while the count yields
            await asyncio.sleep(0)
            table[key] = b"{}"
            counts.added([key])
        await counting

    own_loop.run_until_complete(count_while_writing())
    for partition in range(PARTITIONS):
        expected = by_partition[partition] + [
            k for k in late if table.partition_for_key(k) == partition
        ]
        assert counts.counts[partition] == len(expected), partition
    assert counts.total(range(PARTITIONS)) == len(written) + len(late)
    assert counts.total([0, PARTITIONS]) is None  # a partition never counted
    own_loop.run_until_complete(counts.count(table, [0], chunk=7))  # the others are given up
    assert counts.total([0]) == len([k for k in written + late if table.partition_for_key(k) == 0])
    assert counts.total([1]) is None
    counts.forget()  # a rebalance: everything is counted again
    assert counts.total([0]) is None


def test_a_rebalance_keeps_the_stores_without_a_garbage_collection(pipeline, monkeypatch):
    """A rebalance reopens a revoked partition's database with its data, and
    runs no full garbage collection (faust's store collected on every
    rebalance, twice per rebalance: ~1 s of blocked event loop each at 100k
    patients, in a standby's takeover). A handle that a reference cycle keeps
    alive is collected when its partition is opened again."""
    import gc

    table = pipeline.patients.table
    store = table.data
    ids = [f"patient-{i}" for i in range(40)]
    for patient_id in ids:
        table[patient_id] = patient_id.encode()
    collections = []
    collect = gc.collect
    monkeypatch.setattr(gc, "collect", lambda *args: collections.append(args) or collect(*args))
    topic = table.changelog_topic.get_topic_name()
    every = {TP(topic, p) for p in range(PARTITIONS)}
    loop = asyncio.get_event_loop()
    # nothing revoked (a standby's takeover), then partitions 0 and 1 revoked and back
    loop.run_until_complete(store.on_rebalance(every, set(), set()))
    revoked = {TP(topic, 0), TP(topic, 1)}
    loop.run_until_complete(store.on_rebalance(every - revoked, revoked, set()))
    assert set(store._dbs) <= {2, 3}
    loop.run_until_complete(store.on_rebalance(every, set(), revoked))
    assert collections == []
    for patient_id in ids:
        assert table.get(patient_id) == patient_id.encode()
    # partition 0's handle held by a cycle: reopening it collects, once, then succeeds
    cycle: list = [store._dbs[0]]
    cycle.append(cycle)
    del cycle
    loop.run_until_complete(store.on_rebalance(every - {TP(topic, 0)}, {TP(topic, 0)}, set()))
    loop.run_until_complete(store.on_rebalance(every, set(), {TP(topic, 0)}))
    assert len(collections) == 1
    for patient_id in ids:
        assert table.get(patient_id) == patient_id.encode()


def test_a_changelog_delivery_after_its_partition_left_does_not_reopen_it(pipeline):
    """The changelog offset a delivery marks as persisted goes to the
    partition's database only while it is open: after a rebalance took the
    partition away (or the store stopped) with its handle still in use
    elsewhere, faust's store reopened it and failed on the RocksDB lock, once
    per delivery."""
    table = pipeline.patients.table
    store = table.data
    table["patient-1"] = b"x"
    partition = key_partition(b"patient-1", PARTITIONS)
    in_use = store._dbs[partition]  # an iterator or snapshot still reading it
    topic = table.changelog_topic.get_topic_name()
    every = {TP(topic, p) for p in range(PARTITIONS)}
    gone = {TP(topic, partition)}
    asyncio.get_event_loop().run_until_complete(store.on_rebalance(every - gone, gone, set()))
    store.set_persisted_offset(TP(topic, partition), 7)
    assert partition not in store._dbs
    del in_use
    asyncio.get_event_loop().run_until_complete(store.on_rebalance(every, set(), gone))
    assert table.get("patient-1") == b"x"


@pytest.mark.parametrize("store_url", ["rocksdb://", "memory://"])
def test_a_changelog_delivered_by_chunk_restores_what_was_written(tmp_path, store_url, own_loop):
    """A standby copy or a recovery reads the changelog by chunk
    (streams.chunked_consumer): each chunk, applied as one event, puts every
    record of it in the copy, with keys that JSON escapes decoded as faust
    decodes them; a tombstone deletes; RocksDB keeps the chunk's last offset as
    the partition's applied offset."""
    writer = _pipeline(tmp_path / "writer", store_url).patients.table
    keys = ["patient-1", 'quote"d', "back\\slash", "caf\u00e9", *(f"p-{i}" for i in range(40))]
    written = {key: f'{{"k":{i}}}'.encode() for i, key in enumerate(keys)}
    producer = _SendLog()
    own_loop.run_until_complete(writer.write_many(written, producer))
    topic = writer.changelog_topic.get_topic_name()
    by_partition: dict[int, list[tuple[bytes | None, bytes | None]]] = {}
    for key in keys:
        raw_key = writer.key_bytes(key)
        by_partition.setdefault(writer.partition_for_key(key), []).append((raw_key, written[key]))
    gone = "p-3"
    by_partition[writer.partition_for_key(gone)].append((writer.key_bytes(gone), None))
    assert sorted((k, v) for _, k, v in producer.sent) == sorted(
        (k, v) for rows in by_partition.values() for k, v in rows if v is not None
    )  # the chunks hold what the writer sent

    copy = _pipeline(tmp_path / "copy", store_url).patients.table
    events = []
    for partition, rows in sorted(by_partition.items()):
        offsets = list(range(100, 100 + len(rows)))
        keys_, values = [k for k, _ in rows], [v for _, v in rows]
        chunk = Chunk(topic, partition, offsets, keys_, values, [None] * len(rows))
        message = SimpleNamespace(tp=TP(topic, partition), partition=partition, offset=offsets[-1],
                                  key=keys_[-1], value=chunk)  # fmt: skip
        events.append(SimpleNamespace(key=None, value=chunk, message=message))
    copy.apply_changelog_batch(events)
    expected = {key: value for key, value in written.items() if key != gone}
    assert copy.values_of(keys) == {**expected, gone: None}
    if store_url.startswith("rocksdb"):
        for partition, rows in by_partition.items():
            assert copy.data.persisted_offset(TP(topic, partition)) == 100 + len(rows) - 1
