"""Reliability on the real broker (issue 6): crashes, a broker restart, a replay
from the beginning and a fuzz of bad records. No mocks; fixed seeds.

The invariant after every fault: each patient's statistics (the latest record
per key in the ``<app_id>-patients-changelog`` topic) equal the batch
computation over the unique valid events the programme produced — nothing lost,
nothing counted twice — the run has settled (tests/settling.py: every
patient's latest score counts all its readings and was computed under the last
published posterior, so a stale score from before the fault fails), and every
produced record is either accepted or dead-lettered, once per origin (topic,
partition, offset), with the expected reason.

Idempotency rests on the patient state (streams.patient_state: every applied
event id with the origin of its raw record), not on Kafka transactions: a crash
or a broker restart re-delivers records whose offsets were not committed, and
those are recognised as replays. Dead letters and scores are at-least-once and
identified by origin / patient.

Sizes are small (tens of patients, a few thousand records, a few minutes per
test on two shared cores). A SIGKILLed group member is only noticed by the group
coordinator after faust's session timeout (60 s), which bounds the time to
recover of the crash tests from below.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from aiokafka import TopicPartition
from settling import Settling, latest_by_key, poll

from cli.kafka_io import (
    all_partitions,
    committed_offsets,
    end_offsets,
    group_lag,
    read_to_end,
    read_until,
)
from cli.programme import Programme, build_programme
from cli.simulate import publish
from cli.worker_process import READY, WorkerProcess
from model.evidence import stacked
from streams.app import measure_models
from streams.catalogue import Catalogue
from streams.kafka_options import aiokafka_options
from streams.patient_state import PatientRecord, origin_key
from streams.settings import Settings

pytestmark = pytest.mark.kafka
MEASURE = "resting_heart_rate"
PARTITIONS = 4
SOURCES = ("enrollments", "wearables", "labs", "pros")


# --- helpers ----------------------------------------------------------------------


@dataclass
class Run:
    """One programme against one app id and topic prefix."""

    bootstrap: str
    name: str
    programme: Programme
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:8])

    @property
    def prefix(self) -> str:
        return f"{self.name}-{self.run_id}."

    @property
    def app_id(self) -> str:
        return f"{self.name}-{self.run_id}"

    @property
    def settings(self) -> Settings:
        return Settings(
            bootstrap_servers=self.bootstrap,
            topic_prefix=self.prefix,
            partitions=PARTITIONS,
            app_id=self.app_id,
        )

    def env(self, data_dir: Path, **extra: str) -> dict[str, str]:
        return {
            "EFFICACY_BOOTSTRAP_SERVERS": self.bootstrap,
            "EFFICACY_TOPIC_PREFIX": self.prefix,
            "EFFICACY_APP_ID": self.app_id,
            "EFFICACY_PARTITIONS": str(PARTITIONS),
            "EFFICACY_WEB_ENABLED": "false",
            "EFFICACY_METRICS_PORT": "0",
            "EFFICACY_DATA_DIR": str(data_dir),
            **extra,
        }

    @property
    def truth(self):
        return self.programme.truth


def small_programme(seed: int, patients: int = 80) -> Programme:
    return build_programme(
        [MEASURE], num_patients=patients, num_cohorts=4, obs_per_patient=30, design="crossover",
        seed=seed, bad_fraction=0.02, duplicate_fraction=0.02,
    )  # fmt: skip


def split_programme(programme: Programme, fraction: float) -> tuple[Programme, Programme]:
    """The enrolments and the first ``fraction`` of the readings (in send order),
    and the remaining readings: to publish in two phases around a fault."""
    ordered = programme.send_order()
    enrolments = [r for r in ordered if r.topic == "enrollments"]
    readings = ordered[len(enrolments) :]
    cut = int(len(readings) * fraction)
    topics = list(programme.records)

    def part(records) -> Programme:
        grouped = {t: [r for r in records if r.topic == t] for t in topics}
        return Programme(grouped, programme.truth, programme.simulated)

    return part(enrolments + readings[:cut]), part(readings[cut:])


class Publisher(threading.Thread):
    """``publish`` (cli.simulate) in a thread, at a bounded rate, so
    a test can break things while records are flowing."""

    def __init__(self, programme: Programme, settings: Settings, rate: float) -> None:
        super().__init__(daemon=True)
        self.programme, self.settings, self.rate = programme, settings, rate
        self.sent = 0
        self.total = sum(len(rs) for rs in programme.records.values())
        self.error: BaseException | None = None

    def run(self) -> None:
        def progress(sent: int, total: int, elapsed: float, final: bool) -> None:
            self.sent = sent

        try:
            asyncio.run(publish(self.programme, self.settings, rate=self.rate, progress=progress))
        except BaseException as error:  # reported by the test
            self.error = error

    def wait_for(self, fraction: float, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while self.sent < fraction * self.total and self.is_alive():
            assert time.monotonic() < deadline, f"publishing stalled at {self.sent}/{self.total}"
            time.sleep(0.05)

    def finish(self, timeout: float = 180.0) -> None:
        self.join(timeout)
        assert not self.is_alive(), "publishing did not finish"
        assert self.error is None, repr(self.error)


def settled_reader(run: Run) -> Settling:
    """done() for read_until, and ``problems(records)``: the run has settled
    (tests/settling.py): the last posterior covers every valid reading, and every
    patient's latest score counts all its readings and was computed under the
    last posterior."""
    return Settling(run.programme, run.prefix, MEASURE)


def wait_settled(
    run: Run, timeout: float, workers: Sequence[WorkerProcess] = ()
) -> tuple[float, list]:
    """Seconds until settled (or the timeout, or quiet with the evidence complete:
    Settling) and the posterior and score records; asserts it settled, showing
    what ``workers`` logged at WARNING or above if not."""
    started = time.monotonic()
    settling = settled_reader(run)
    records = asyncio.run(
        read_until(
            run.bootstrap,
            [run.prefix + "population-posterior", run.prefix + "scores"],
            done=settling,
            timeout=timeout,
        )
    )
    seconds = time.monotonic() - started
    problems = settling.problems(records)
    assert not problems, f"not settled after {seconds:.0f} s: {len(problems)} problems, " + (
        f"e.g. {problems[:5]}\n"
        + diagnosis(run, records, problems[0])
        + "".join(f"\nworker {i} warned:\n{w.log_warnings()}" for i, w in enumerate(workers))
    )
    return seconds, records


def diagnosis(run: Run, records: list, problem: str) -> str:
    """For a settle failure: the first problem patient's history, or whether
    the table's statistics are complete (a posterior short of readings)."""
    patient = problem.split(":")[0]
    if patient in run.truth.patients:
        return patient_history(run, records, patient)
    mismatch = statistics_mismatch(run, patient_states(run))
    return f"the patients table: {mismatch or 'every statistic equals the batch computation'}"


def patient_history(run: Run, records: list, patient: str) -> str:
    """What a failing settle needs to be diagnosed: a patient's scores (by
    partition offset) and table changelog records, each with its counts."""
    lines = [f"history of {patient}:"]
    for record in records:
        if record.topic == run.prefix + "scores" and record.key == patient.encode():
            (m,) = json.loads(record.value)["measures"]
            lines.append(f"  score p{record.partition}@{record.offset} t={record.timestamp} "
                         f"counts {m['count_exposed'] + m['count_unexposed']} "
                         f"v{m['population_version']}")  # fmt: skip
    changelog = asyncio.run(read_to_end(run.bootstrap, f"{run.app_id}-patients-changelog"))
    for record in changelog:
        if record.value and json.loads(record.key) == patient:
            state = PatientRecord.model_validate_json(record.value).measures.get(MEASURE)
            counts = state and state.count_exposed + state.count_unexposed
            lines.append(f"  state p{record.partition}@{record.offset} t={record.timestamp} "
                         f"counts {counts}")  # fmt: skip
    return "\n".join(lines)


def wait_idle(bootstrap: str, topics: list[str], quiet: float, timeout: float) -> float:
    """Poll the end offsets of ``topics`` until they have not moved for ``quiet``
    seconds; returns the seconds waited (asserts within ``timeout``)."""
    started = time.monotonic()
    state = {"offsets": None, "since": started}

    def unchanged_for() -> float:
        offsets = asyncio.run(end_offsets(bootstrap, topics))
        now = time.monotonic()
        if offsets != state["offsets"]:
            state["offsets"], state["since"] = offsets, now
        return now - state["since"]

    quiet_for = poll(unchanged_for, lambda s: s >= quiet, timeout=timeout, interval=1.0)
    assert quiet_for >= quiet, f"{topics} still written to after {timeout} s"
    return time.monotonic() - started


def patient_states(run: Run) -> dict[str, PatientRecord]:
    changelog = asyncio.run(read_to_end(run.bootstrap, f"{run.app_id}-patients-changelog"))
    return {
        json.loads(key): PatientRecord.model_validate_json(record.value)
        for key, record in latest_by_key(changelog).items()
        if record.value  # faust JSON-encodes the keys
    }


def batch_statistics(run: Run):
    """The batch computation over the unique valid readings with the simulated exposure."""
    models = measure_models(Catalogue.load(), Settings())
    patients = sorted(run.truth.patients)
    expected = run.programme.expected_statistics(MEASURE, models[MEASURE], patients)
    return patients, expected


def statistics_mismatch(run: Run, states: dict[str, PatientRecord]) -> str | None:
    """None when every patient's statistics equal the batch computation; else what differs."""
    patients, expected = batch_statistics(run)
    missing = sorted(set(patients) - set(states))
    if missing:
        return f"{len(missing)} patients without state, e.g. {missing[:3]}"
    counts = np.array(
        [
            [state.measures[MEASURE].count_exposed, state.measures[MEASURE].count_unexposed]
            if MEASURE in (state := states[p]).measures
            else [0, 0]
            for p in patients
        ]
    )
    truth = np.stack([expected.count_exposed, expected.count_unexposed], axis=1)
    wrong = np.flatnonzero((counts != truth).any(axis=1))
    if wrong.size:
        lost = int(np.clip(truth - counts, 0, None).sum())
        extra = int(np.clip(counts - truth, 0, None).sum())
        return (
            f"{wrong.size} patients with wrong counts: {lost} readings lost, {extra} counted "
            f"twice; e.g. {patients[wrong[0]]}: {counts[wrong[0]]} vs {truth[wrong[0]]}"
        )
    gram = stacked([states[p].measures[MEASURE].gram for p in patients], expected.gram.shape[1:])
    if not np.allclose(gram, expected.gram, rtol=1e-9, atol=1e-8):
        return f"Gram matrices differ by up to {np.abs(gram - expected.gram).max():.3g}"
    return None


def assert_statistics_equal_batch(run: Run, timeout: float = 60.0) -> dict[str, PatientRecord]:
    """The changelog's latest states equal the batch computation (polled: the
    last table writes may still be in the worker's producer buffer)."""
    states = poll(
        lambda: patient_states(run),
        lambda states: statistics_mismatch(run, states) is None,
        timeout=timeout,
        interval=2.0,
    )
    problem = statistics_mismatch(run, states)
    assert problem is None, problem
    return states


def dead_letters_by_origin(run: Run, expected: int, timeout: float = 60.0) -> tuple[dict, int]:
    """Dead letters by origin (source topic, partition, offset), waiting for at
    least ``expected`` distinct origins; and the number of dead-letter records."""

    def by_origin(records) -> dict:
        letters = (json.loads(r.value) for r in records)
        return {(d["source_topic"], d["partition"], d["offset"]): d for d in letters}

    records = asyncio.run(
        read_until(
            run.bootstrap,
            [run.prefix + "deadletter"],
            done=lambda rs: len(by_origin(rs)) >= expected,
            timeout=timeout,
        )
    )
    return by_origin(records), len(records)


def assert_every_record_accounted_for(run: Run) -> int:
    """Dead letters: one origin per bad record or duplicate, with its expected
    reason; accepted + dead-lettered = produced. Returns the dead-letter
    records read (at-least-once: a replayed bad record may be there twice)."""
    truth = run.truth
    expected = Counter(b.reason for b in truth.bad_records)
    expected["duplicate"] += len(truth.duplicates)
    letters, records = dead_letters_by_origin(run, sum(expected.values()))
    assert Counter(d["reason"] for d in letters.values()) == expected
    produced = sum(sent.records for sent in truth.sent.values())
    accepted = truth.enrollment_events + truth.valid_unique_readings
    assert accepted + len(letters) == produced
    return records


# --- 1. a worker crashes -------------------------------------------------------------


@pytest.mark.parametrize("restart", [False, True], ids=["not-restarted", "restarted"])
def test_sigkilled_worker_loses_nothing_and_counts_nothing_twice(
    kafka_bootstrap, tmp_path, restart
):
    """Two workers share the group; one is SIGKILLed with ~40% of the records
    sent. Restarted or not (the survivor then takes over its partitions after the
    session timeout), the statistics equal the batch computation afterwards."""
    run = Run(kafka_bootstrap, "crash", small_programme(seed=21 if restart else 22))
    # RocksDB, as in production: a standby copy in memory keeps no changelog offset,
    # so a takeover would replay the whole changelog anyway.
    store = {} if restart else {"EFFICACY_STORE_URL": "rocksdb://"}
    first = WorkerProcess(run.env(tmp_path / "a", **store))
    second = WorkerProcess(run.env(tmp_path / "b", **store))
    try:
        first.start()
        first.wait_for_log(READY)
        second.start()
        second.wait_for_log(READY)
        first.wait_for_log(r"Successfully synced group .* with generation \d+", count=2)
        # both members hold partitions before the first record is sent
        publisher = Publisher(run.programme, run.settings, rate=500)
        publisher.start()
        publisher.wait_for(0.4)
        victim = second
        code = victim.kill()
        killed_at = time.monotonic()
        sent_at_kill = publisher.sent
        if restart:
            time.sleep(2.0)  # down for a moment before it comes back (no assertion waits on it)
            victim.start()
        publisher.finish()
        wait_settled(run, timeout=600, workers=[first, second])
        recovered = time.monotonic() - killed_at
        survivors = [first, victim] if restart else [first]
        for worker in survivors:
            assert worker.alive(), worker.log_tail()
        print(
            f"SIGKILL (exit {code}) after {sent_at_kill}/{publisher.total} records sent; "
            f"{'restarted' if restart else 'not restarted'}; settled {recovered:.1f} s after "
            f"the kill"
        )
        assert_statistics_equal_batch(run)
        letters = assert_every_record_accounted_for(run)
        print(f"dead-letter records {letters} for {len(run.truth.bad_records)} bad records "
              f"and {len(run.truth.duplicates)} duplicates")  # fmt: skip
        if not restart:
            # The survivor held standby copies of the victim's partitions
            # (EFFICACY_STANDBY_REPLICAS, 1 by default): its takeover reads at most a
            # tail of the changelog, not all of it.
            replayed, written = first.takeover_replay(f"{run.app_id}-patients-changelog")
            print(f"takeover replayed {replayed} of {written} patients changelog records")
            assert written > 0 and replayed <= written / 4, (replayed, written)
    finally:
        for worker in (first, second):
            worker.stop()


# --- 2. the broker restarts ----------------------------------------------------------


def test_broker_restart_mid_stream_resumes_with_the_same_invariant(tmp_path):
    """A dedicated broker (so the shared one is not disturbed) is stopped and
    started again, same port and data, while the worker is processing: the
    worker reconnects and the invariant holds. The producer publishes in two
    phases around the outage (a producer facing a dead broker is not the
    pipeline's fault to handle)."""
    from cli.broker import LocalKafka

    kafka = LocalKafka(log=lambda m: print(f"[kafka] {m}", flush=True))
    bootstrap = kafka.start()
    try:
        run = Run(bootstrap, "brokerrestart", small_programme(seed=24, patients=60))
        before, after = split_programme(run.programme, 0.5)
        with WorkerProcess(run.env(tmp_path / "w")) as worker:
            worker.wait_for_log(READY)
            asyncio.run(publish(before, run.settings))
            raw = [run.prefix + t for t in SOURCES]
            # the broker goes down mid-stream: once the worker has committed some
            # of the first half, but not all of it (a lag still to work through)
            sent = sum(len(rs) for rs in before.records.values())
            lag = poll(
                lambda: asyncio.run(group_lag(bootstrap, run.app_id, raw)),
                lambda lag: lag < sent,
                timeout=120,
                interval=0.2,
            )
            assert lag < sent, "the worker committed nothing of the first half"
            print(f"broker stopped with {lag} of {sent} records not yet committed")
            down = time.monotonic()
            kafka.stop(keep_data=True)
            time.sleep(5.0)  # the outage: how long the broker stays down (no assertion waits on it)
            kafka.start()
            print(f"broker down for {time.monotonic() - down:.1f} s")
            asyncio.run(publish(after, run.settings))
            wait_settled(run, timeout=600, workers=[worker])
            print(f"settled {time.monotonic() - down:.1f} s after the broker stopped")
            assert worker.alive(), worker.log_tail()
            assert_statistics_equal_batch(run)
            assert_every_record_accounted_for(run)
            assert worker.stop() == 0, worker.log_tail()
    finally:
        kafka.stop()


def test_a_worker_killed_with_writes_waiting_on_a_stopped_broker_loses_nothing(tmp_path):
    """The worker awaits the delivery of every state and output record of a
    batch before the batch's events are acknowledged (streams/output.py). A
    dedicated broker stops while the worker still has fetched records to
    process: its writes wait, the worker waits with them (it neither skips
    the batch nor commits past it), and is then killed with writes undelivered.
    With the broker back, a new worker on the same data resumes from the
    committed offsets: nothing lost and nothing counted twice. One record per
    batch, a producer linger of 100 ms and 600 patients (21k records), so the
    worker is mid-way through its fetched records when the broker stops: it
    writes about a thousand records a second between two polls (3.1-4.7k of
    21k written when the broker stopped; at 300 patients without the linger,
    7.2k of 10.5k, past the middle)."""
    from cli.broker import LocalKafka

    kafka = LocalKafka(log=lambda m: print(f"[kafka] {m}", flush=True))
    bootstrap = kafka.start()
    try:
        run = Run(bootstrap, "deliverywait", small_programme(seed=26, patients=600))
        first = WorkerProcess(
            run.env(tmp_path / "w", EFFICACY_BATCH_SIZE="1", EFFICACY_PRODUCER_LINGER_MS="100")
        )
        try:
            # The worker creates the topics; the whole programme then waits for it.
            first.start()
            first.wait_for_log(READY)
            assert first.stop() == 0, first.log_tail()
            asyncio.run(publish(run.programme, run.settings))
            first.start()
            # Mid-stream: some of the state written, far from all (one changelog
            # record per record, one record per batch).
            changelog = [f"{run.app_id}-patients-changelog"]
            written = poll(
                lambda: sum(asyncio.run(end_offsets(bootstrap, changelog)).values()),
                lambda written: written >= 500,
                timeout=300,
                interval=0.2,
            )
            sent = sum(len(rs) for rs in run.programme.records.values())
            assert 500 <= written < sent / 2, f"{written} state writes of {sent} records"
            kafka.stop(keep_data=True)
            print(f"broker stopped after {written} state writes for {sent} records")
            assert first.wait(timeout=10.0) is None, first.log_tail()  # waits, alive
        finally:
            first.kill()
        kafka.start()
        with WorkerProcess(run.env(tmp_path / "w")) as second:
            wait_settled(run, timeout=600, workers=[second])
            assert second.alive(), second.log_tail()
            assert_statistics_equal_batch(run)
            assert_every_record_accounted_for(run)
            assert second.stop() == 0, second.log_tail()
    finally:
        kafka.stop()


async def set_topic_configs(bootstrap: str, topic: str, configs: dict[str, str]) -> dict:
    """Set ``configs`` on ``topic`` on top of its other overrides (AlterConfigs
    replaces every override at once); returns the overrides it had before."""
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

    admin = AIOKafkaAdminClient(**aiokafka_options(bootstrap))
    await admin.start()
    try:
        resource = ConfigResource(ConfigResourceType.TOPIC, topic)
        (response,) = await admin.describe_configs([resource])
        (_, _, _, _, entries) = response.resources[0]
        # (name, value, read_only, is_default | config source, …): v0 flags the
        # defaults, later versions give the source (1: the topic's own override)
        if response.API_VERSION == 0:
            before = {entry[0]: entry[1] for entry in entries if not entry[3]}
        else:
            before = {entry[0]: entry[1] for entry in entries if entry[3] == 1}
        await admin.alter_configs(
            [ConfigResource(ConfigResourceType.TOPIC, topic, configs={**before, **configs})]
        )
    finally:
        await admin.close()
    return before


def test_a_failed_changelog_delivery_stops_the_worker_before_its_offsets_are_committed(
    kafka_bootstrap, tmp_path
):
    """The broker refuses the patients changelog's records mid-stream (its
    ``max.message.bytes`` lowered below a patient record: a non-retriable
    MESSAGE_TOO_LARGE for every state write). The worker must stop with
    EX_TEMPFAIL (streams/output.py), and no committed offset may lie past a
    record whose state or dead letter was not persisted: every raw record below
    the group's committed offsets is in the persisted state (an applied or held
    event, by its origin) or in the dead-letter topic. With the topic mended, a
    worker on a new host (empty data directory: only what Kafka holds) resumes
    from those offsets: nothing lost and nothing counted twice."""
    from streams.output import EXIT_DELIVERY_FAILED

    run = Run(kafka_bootstrap, "changelogfail", small_programme(seed=27, patients=120))
    changelog = f"{run.app_id}-patients-changelog"
    first = WorkerProcess(run.env(tmp_path / "a", EFFICACY_BATCH_SIZE="50"))
    publisher = Publisher(run.programme, run.settings, rate=400)
    try:
        first.start()
        first.wait_for_log(READY)
        publisher.start()
        # Mid-stream: once the worker has committed some of what it read
        committed = poll(
            lambda: sum(asyncio.run(committed_offsets(kafka_bootstrap, run.app_id)).values()),
            lambda committed: committed >= 500,
            timeout=120,
            interval=0.2,
        )
        asyncio.run(set_topic_configs(kafka_bootstrap, changelog, {"max.message.bytes": "200"}))
        print(f"changelog refused with {committed} records committed, {publisher.sent} sent")
        code = first.wait(timeout=120.0)
        assert code == EXIT_DELIVERY_FAILED, first.log_tail()
        assert "stopping the worker" in first.log_text()
        publisher.finish()
    finally:
        first.kill()

    committed = asyncio.run(committed_offsets(kafka_bootstrap, run.app_id))
    states = patient_states(run)
    persisted = set()
    for state in states.values():
        persisted.update(state.seen_origins())
        persisted.update(origin_key(held.origin) for held in state.pending)
    letters = asyncio.run(read_to_end(kafka_bootstrap, run.prefix + "deadletter"))
    for letter in map(json.loads, (r.value for r in letters)):
        persisted.add(f"{letter['source_topic']}:{letter['partition']}:{letter['offset']}")
    raw = [r for t in SOURCES for r in asyncio.run(read_to_end(kafka_bootstrap, run.prefix + t))]
    below = [r for r in raw if r.offset < committed.get(TopicPartition(r.topic, r.partition), 0)]
    lost = [r for r in below if f"{r.topic}:{r.partition}:{r.offset}" not in persisted]
    print(f"{len(below)} of {len(raw)} raw records below the committed offsets")
    assert 0 < len(below) < len(raw), "the failure did not come mid-stream"
    assert not lost, (
        f"{len(lost)} records below the committed offsets are in no persisted state or "
        f"dead letter, e.g. {lost[0].topic}:{lost[0].partition}:{lost[0].offset}"
    )

    asyncio.run(set_topic_configs(kafka_bootstrap, changelog, {"max.message.bytes": "1048588"}))
    with WorkerProcess(run.env(tmp_path / "b")) as second:
        wait_settled(run, timeout=600, workers=[second])
        assert second.alive(), second.log_tail()
        assert_statistics_equal_batch(run)
        assert_every_record_accounted_for(run)
        assert second.stop() == 0, second.log_tail()


# --- 3. replay from the beginning -----------------------------------------------------


async def reset_group_offsets(bootstrap: str, group: str, topics: list[str]) -> int:
    """Commit offset 0 for every partition of ``topics`` in ``group`` (which must
    have no live member). Returns the number of partitions reset."""
    from aiokafka import AIOKafkaConsumer
    from aiokafka.structs import OffsetAndMetadata

    consumer = AIOKafkaConsumer(
        **aiokafka_options(bootstrap),
        group_id=group,
        enable_auto_commit=False,
        metadata_max_age_ms=500,
    )
    await consumer.start()
    try:
        partitions = await all_partitions(consumer, topics)
        consumer.assign(partitions)
        await consumer.commit({tp: OffsetAndMetadata(0, "") for tp in partitions})
        return len(partitions)
    finally:
        await consumer.stop()


QUIET = 10.0  # s of idle output topics after the replay: 5 population ticks of 2 s


def test_replay_from_the_beginning_leaves_every_posterior_unchanged(kafka_bootstrap, tmp_path):
    """After a settled run the worker stops, its consumer group (faust's group id
    is the app id) is reset to offset 0 on the source and internal topics, and a
    new worker replays everything: statistics, population posteriors and scores
    are unchanged (replays are recognised by event id and origin), and no new
    posterior version is published (the population agent sees evidence it has
    already fitted: same digest). The replay is over when the group has
    committed every offset of the source and population-evidence topics and the
    output topics have then stayed idle for QUIET seconds (several population
    ticks, so an unwanted refit would have been published)."""
    run = Run(kafka_bootstrap, "replay", small_programme(seed=25, patients=60))
    topics = [run.prefix + t for t in (*SOURCES, "population-evidence")]
    outputs = [run.prefix + "population-posterior", run.prefix + "scores"]
    worker = WorkerProcess(run.env(tmp_path / "w"))
    try:
        worker.start()
        worker.wait_for_log(READY)
        asyncio.run(publish(run.programme, run.settings))
        wait_settled(run, timeout=600, workers=[worker])
        assert worker.stop() == 0, worker.log_tail()
        states = assert_statistics_equal_batch(run, timeout=5)
        first = {t: asyncio.run(read_to_end(kafka_bootstrap, t)) for t in outputs}
        letters = len(asyncio.run(read_to_end(kafka_bootstrap, run.prefix + "deadletter")))

        reset = asyncio.run(reset_group_offsets(kafka_bootstrap, run.app_id, topics))
        assert reset == len(topics) * PARTITIONS
        assert asyncio.run(group_lag(kafka_bootstrap, run.app_id, topics)) > 0
        replay_started = time.monotonic()
        worker.start()
        lag = poll(
            lambda: asyncio.run(group_lag(kafka_bootstrap, run.app_id, topics)) if worker.alive() else -1,
            lambda lag: lag <= 0,
            timeout=240,
            interval=2.0,
        )  # fmt: skip
        assert lag == 0, f"the replay did not finish (lag {lag}): {worker.log_tail()}"
        replayed = time.monotonic() - replay_started
        quiet = wait_idle(kafka_bootstrap, [*outputs, topics[-1]], quiet=QUIET, timeout=180)
        assert worker.alive(), worker.log_tail()
        assert worker.stop() == 0, worker.log_tail()

        again = len(asyncio.run(read_to_end(kafka_bootstrap, run.prefix + "deadletter")))
        assert again >= 2 * letters  # every bad record was read and rejected again
        after_states = patient_states(run)
        assert after_states == states
        second = {t: asyncio.run(read_to_end(kafka_bootstrap, t)) for t in outputs}
        new_posteriors = len(second[outputs[0]]) - len(first[outputs[0]])
        print(f"replay of {letters} dead letters and all records done in {replayed:.1f} s, "
              f"then idle after {quiet:.1f} s; {new_posteriors} new posteriors, "
              f"{len(second[outputs[1]]) - len(first[outputs[1]])} new score records")  # fmt: skip
        assert new_posteriors == 0
        problems = settled_reader(run).problems(second[outputs[0]] + second[outputs[1]])
        assert not problems, problems[:5]
        for topic in outputs:
            before = {k: json.loads(r.value) for k, r in latest_by_key(first[topic]).items()}
            now = {k: json.loads(r.value) for k, r in latest_by_key(second[topic]).items()}
            assert set(now) == set(before)
            for key, message in now.items():
                if topic == outputs[0]:
                    old = before[key]
                    for name, interval in message["summary"].items():
                        assert interval["mean"] == pytest.approx(
                            old["summary"][name]["mean"], abs=1e-9
                        ), name
                else:
                    (m,) = message["measures"]
                    (o,) = before[key]["measures"]
                    assert m["effect"]["mean"] == pytest.approx(o["effect"]["mean"], abs=1e-9)
                    assert m["effect"]["sd"] == pytest.approx(o["effect"]["sd"], abs=1e-9)
    finally:
        worker.stop()


# --- 4. a fuzz of bad records -----------------------------------------------------------

FUZZ_RECORDS = 10_000
ENROLLED = [f"fuzz-patient-{i}" for i in range(8)]
GHOSTS = [f"ghost-{i}" for i in range(3)]  # never enrolled
#: Every kind of bad record, with the dead-letter reasons it may get (a fuzzed
#: byte string may happen to be valid JSON of the wrong shape, say). ``unknown
#: patient`` readings are held in the patient's state until the enrolment
#: arrives (up to MAX_PENDING each, then dead-lettered ``not_enrolled``).
FUZZ_REASONS = {
    "malformed_json": {"malformed_json", "invalid_schema", "empty"},
    "wrong_type": {"invalid_schema"},
    "missing_field": {"invalid_schema"},
    "unknown_measure": {"unknown_measure"},
    "wrong_source": {"wrong_source"},
    "unknown_unit": {"unknown_unit"},
    "impossible_value": {"implausible_value", "invalid_schema", "malformed_json"},
    "future_time": {"future_time"},
    "ancient_time": {"ancient_time"},
    "oversized": {"oversized"},
    "wrong_key": {"key_mismatch"},
    "bad_enrollment": {"malformed_json", "invalid_schema", "key_mismatch", "empty"},
    "unknown_patient": {"not_enrolled"},
}
#: Draw weights (oversized records are 64 KiB each: rarer).
FUZZ_KINDS = [k for k in FUZZ_REASONS for _ in range(1 if k == "oversized" else 4)]


def fuzz_strategy(now):
    """A hypothesis strategy of (kind, topic, key, value) bad records."""
    from datetime import timedelta

    from hypothesis import strategies as st

    catalogue = Catalogue.load()
    recent = st.integers(0, 30 * 86400).map(lambda s: now - timedelta(seconds=s))
    wrong_values = st.one_of(
        st.none(),
        st.lists(st.integers(), max_size=3),
        st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
    )  # fmt: skip  never valid for any field

    @st.composite
    def record(draw):
        kind = draw(st.sampled_from(FUZZ_KINDS))
        patient = draw(st.sampled_from(GHOSTS if kind == "unknown_patient" else ENROLLED))
        reading = {
            "event_id": "placeholder",
            "event_time": draw(recent).isoformat(),
            "patient_id": patient,
            "measure": MEASURE,
            "value": draw(st.floats(40, 180)),
            "unit": draw(st.sampled_from(["bpm", "beats/min", "1/min"])),
        }
        topic, key = "wearables", patient.encode()
        if kind == "malformed_json":
            value = draw(st.one_of(st.binary(max_size=40), st.text(max_size=40).map(str.encode)))
            value = (
                value if not value.startswith(b"{") or not value.endswith(b"}") else b"{" + value
            )
            return kind, draw(st.sampled_from(SOURCES)), key, value
        if kind == "wrong_type":
            field_ = draw(st.sampled_from(["event_time", "patient_id", "measure", "value", "unit"]))
            reading[field_] = draw(wrong_values)
        elif kind == "missing_field":
            del reading[draw(st.sampled_from(sorted(reading)))]
        elif kind == "unknown_measure":
            reading["measure"] = draw(
                st.text("abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=30).filter(
                    lambda m: m not in catalogue.measures
                )
            )
        elif kind == "wrong_source":
            reading["measure"], reading["unit"] = "hba1c", "%"
            reading["value"] = draw(st.floats(4, 12))
        elif kind == "unknown_unit":
            reading["unit"] = draw(
                st.text("abcdefghij/%", min_size=1, max_size=10).filter(
                    lambda u: u not in ("bpm", "beats/min", "1/min")
                )
            )
        elif kind == "impossible_value":
            reading["value"] = draw(
                st.one_of(st.floats(max_value=24.9), st.floats(min_value=220.1))
            )
        elif kind == "future_time":
            reading["event_time"] = (now + timedelta(days=draw(st.floats(2, 3000)))).isoformat()
        elif kind == "ancient_time":
            reading["event_time"] = (now - timedelta(days=draw(st.floats(3700, 40000)))).isoformat()
        elif kind == "oversized":
            reading["device"] = "x" * draw(st.integers(64 * 1024, 66 * 1024))
        elif kind == "wrong_key":
            key = draw(st.one_of(st.none(), st.sampled_from(ENROLLED + GHOSTS).map(str.encode)))
            if key == patient.encode():
                key = None
        elif kind == "bad_enrollment":
            topic = "enrollments"
            event = {"event_id": "placeholder", "event_time": reading["event_time"],
                     "kind": draw(st.sampled_from(["enrollment", "exposure", "other"])),
                     "patient_id": patient, "cohort": "c", "exposure": draw(st.floats(-5, -0.1))}  # fmt: skip
            if event["kind"] == "enrollment":
                event["cohort"] = draw(wrong_values)
            return kind, topic, key, json.dumps(event).encode()
        return kind, topic, key, json.dumps(reading).encode()

    return record()


def generate_fuzz(count: int, now) -> list[tuple[str, str, bytes | None, bytes]]:
    """``count`` records drawn by hypothesis, deterministically (derandomize)."""
    from hypothesis import HealthCheck, Phase, given, settings

    drawn: list = []

    @settings(max_examples=count, derandomize=True, database=None, deadline=None,
              phases=[Phase.generate], suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(fuzz_strategy(now))
    def collect(record) -> None:
        drawn.append(record)

    collect()
    # unique event ids, so a record is judged on its own defect, not as a duplicate
    out = []
    for i, (kind, topic, key, value) in enumerate(drawn[:count]):
        out.append((kind, topic, key, value.replace(b'"placeholder"', f'"fuzz-{i}"'.encode())))
    return out


async def produce_with_origins(bootstrap: str, prefix: str, records) -> list:
    from aiokafka import AIOKafkaProducer

    # A generous request timeout: a CI run saw this producer's batch wait ~90 s
    # for the shared broker (KafkaTimeoutError) before the worker was tested.
    producer = AIOKafkaProducer(
        **aiokafka_options(bootstrap),
        acks="all",
        linger_ms=20,
        max_request_size=4 * 1024 * 1024,
        request_timeout_ms=300_000,
    )
    await producer.start()
    try:
        futures = [await producer.send(prefix + t, value=v, key=k) for _, t, k, v in records]
        metadata = [await f for f in futures]
    finally:
        await producer.stop()
    return [(m.topic, m.partition, m.offset) for m in metadata]


def test_fuzzed_bad_records_are_all_accounted_for_and_never_crash_the_worker(
    kafka_bootstrap, tmp_path
):
    """>= 10,000 hypothesis-drawn bad records on the source topics: the worker
    survives; every record is dead-lettered with a reason its defect allows, or
    (readings of never-enrolled patients) held in that patient's state;
    accepted + held + dead-lettered = produced, each origin exactly once."""
    from datetime import UTC, datetime

    from streams.schemas import Enrollment
    from streams.topics import ensure_topics

    now = datetime.now(UTC)
    started = time.monotonic()
    records = generate_fuzz(FUZZ_RECORDS, now)
    generated = time.monotonic() - started
    assert len(records) == FUZZ_RECORDS
    kinds = Counter(kind for kind, *_ in records)
    assert set(kinds) == set(FUZZ_REASONS), kinds
    enrolments = [
        ("enrollment", "enrollments", p.encode(),
         Enrollment(event_id=f"fuzz-enrol-{p}", event_time=now, patient_id=p, cohort="c1")
         .model_dump_json().encode())
        for p in ENROLLED
    ]  # fmt: skip
    run = Run(kafka_bootstrap, "fuzz", small_programme(seed=26, patients=5))
    asyncio.run(ensure_topics(run.settings))
    with WorkerProcess(run.env(tmp_path / "w")) as worker:
        worker.wait_for_log(READY)
        enrolled = asyncio.run(produce_with_origins(kafka_bootstrap, run.prefix, enrolments))
        origins = asyncio.run(produce_with_origins(kafka_bootstrap, run.prefix, records))
        kind_of = dict(zip(origins, (kind for kind, *_ in records), strict=True))
        expected_letters = FUZZ_RECORDS - kinds["unknown_patient"]
        letters, _ = dead_letters_by_origin(run, expected_letters, timeout=240)

        def held_origins(states) -> set:
            return {(o.origin.topic, o.origin.partition, o.origin.offset)
                    for s in states.values() for o in s.pending}  # fmt: skip

        # the held readings' last table writes: until every origin is held or a letter
        states = poll(
            lambda: patient_states(run),
            lambda states: held_origins(states) | set(letters) >= set(origins),
            timeout=60,
        )
        assert worker.alive(), worker.log_tail()
        log = worker.log_text()
        assert worker.stop() == 0, worker.log_tail()
    assert "Traceback" not in log, log[log.index("Traceback") - 200 :][:3000]
    accepted = {
        tuple(origin.rsplit(":", 2)) for s in states.values() for origin in s.seen_origins()
    }
    accepted = {(t, int(p), int(o)) for t, p, o in accepted}
    held = held_origins(states)
    assert accepted == set(enrolled)
    assert not (held & set(letters)) and not (accepted & set(letters))
    assert held | set(letters) == set(origins), (
        f"{len(set(origins) - held - set(letters))} records neither held nor dead-lettered"
    )
    wrong = Counter(
        (kind_of[o], d["reason"])
        for o, d in letters.items()
        if d["reason"] not in FUZZ_REASONS[kind_of[o]]
    )
    assert not wrong, wrong
    assert {kind_of[o] for o in held} <= {"unknown_patient"}
    print(f"fuzz: {FUZZ_RECORDS} records generated in {generated:.1f} s; "
          f"{len(letters)} dead-lettered, {len(held)} held for never-enrolled patients; "
          f"reasons {Counter(d['reason'] for d in letters.values())}")  # fmt: skip
