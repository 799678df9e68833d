"""Throughput and latency of one worker on a real Kafka broker (issue 6).

    python -m benchmarks.throughput            # ~7 min idle -> results/throughput.json
    python -m benchmarks.throughput --quick    # smaller, -> results/throughput_quick.json
    python -m benchmarks.throughput --cprofile-worker /tmp/w.prof   # + a profiled extra repeat
    python -m benchmarks.throughput --py-spy /tmp/pyspy/bin/py-spy   # + a profile of the worker
    python -m benchmarks.throughput --quick --compare-security   # plaintext, then SASL_SSL
                                              # -> results/throughput_security.json

``--security sasl_ssl`` runs on the launcher's SASL_SSL broker (TLS, SCRAM-SHA-512,
ACLs; cli/broker.py): the worker as a user with ``worker_acls``, this process's
clients as the admin. ``--compare-security`` runs the throughput repeats on a
plaintext broker and then on a SASL_SSL one (each started for its run, one at a
time), and reports the ratio of the sustained rates; it skips the latency and
ceiling phases (``--throughput-only``).

What is measured, in one run (one broker, one ``efficacy worker`` subprocess with
``EFFICACY_PARTITIONS`` partitions, memory store):

1. Set-up (not timed): topics are created, a population posterior for the measure
   is fitted here (``PopulationModel``, as the population agent does) on a warm-up
   programme and published, the worker is started with the population timer
   effectively off (``population_interval_seconds`` = 3600: a refit would make every
   patient rescore, which is a separate cost), and the warm-up programme is run
   through the worker until every one of its patients is processed (JIT of scoring).
2. Throughput, ``--repeats`` times with fresh patients: a whole programme
   (enrolments, exposure changes, readings in event-time order) is produced as fast
   as possible (much faster than the worker consumes: a backlog). Progress is read
   off the worker's own output: every processed batch forwards each touched
   patient's statistics to ``population-evidence`` with the number of readings
   applied so far, so "readings processed by time t" is known from the Kafka
   timestamps of those records. ``events_per_s`` is the steady rate between 10% and
   90% of readings processed (median over repeats); ``events_per_s_overall`` counts
   every produced record from the first send to the last score or evidence record.
   Evidence records are EvidenceBatch messages: every patient a batch touched.
3. Latency, at half the median sustained rate: fresh patients are enrolled, then
   their readings are sent paced at that rate for ``--latency-seconds``. For a
   reading that is the patient's k-th, the latency is from the producer's send call
   (wall clock, this process) to the Kafka timestamp (CreateTime, stamped by the
   worker's producer, same machine clock) of the first score of that patient whose
   ``count_exposed + count_unexposed`` is ≥ k, counted only when that score comes from
   the batch that applied reading k (its count equals the count of the first
   evidence record with count ≥ k). Readings whose batch changed the score too
   little to republish it (``changed_materially``) have no score of their own and
   are reported as a fraction; ``processed`` latencies (to the evidence record,
   which every batch emits) cover every reading.
4. Ceiling (worker stopped): a plain aiokafka consumer reads every record of the
   raw topics written in this run and parses each value with ``json.loads``
   (``raw_consume_events_per_s``), and, separately, with the validation's pydantic
   schema (``raw_consume_validate_events_per_s``); median over repeats. Then a bare
   faust agent (benchmarks.faust_ceiling: ``take_events`` + ``json.loads``) reads
   the same records (``faust_consume_events_per_s``): the ceiling of any faust
   worker that takes records one by one, whatever it does per record; and the
   same agent on streams.chunked_consumer, one event per fetched partition chunk
   (``faust_chunked_consume_events_per_s``), runs paired with it.

Uses the broker named by ``KAFKA_BOOTSTRAP_SERVERS`` or starts a local one (the
SASL_SSL runs always start a local one).
Broker, worker and this process share the machine's cores (say so when quoting).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

from benchmarks.common import cpu_seconds, machine, median, say, scrape_metrics, write_json
from streams.kafka_options import aiokafka_options
from streams.patient_step import STAGES
from streams.settings import Settings

MEASURE = "resting_heart_rate"
TOPICS = (
    "enrollments",
    "wearables",
    "labs",
    "pros",
    "deadletter",
    "population-evidence",
    "population-posterior",
    "scores",
    "alerts",
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--patients", type=int, default=None, help="patients per throughput repeat (10000)")
    add("--obs-per-patient", type=int, default=10, help="readings per patient (throughput)")
    add("--repeats", type=int, default=None, help="throughput repeats (3)")
    add("--warm-patients", type=int, default=300)
    add("--latency-seconds", type=float, default=None, help="(40)")
    add("--latency-obs-per-patient", type=int, default=10)
    add(
        "--latency-rate",
        type=float,
        default=100.0,
        help="readings/s of the latency phase when --repeats is 0 (no throughput phase)",
    )
    add("--partitions", type=int, default=4)
    add(
        "--quick",
        action="store_true",
        help="4000 patients, 2 repeats, 20 s latency, unless given explicitly",
    )
    add("--py-spy", default=None, help="py-spy executable: profile the worker in one phase")
    add(
        "--py-spy-phase",
        choices=("throughput", "latency"),
        default="throughput",
        help="the phase --py-spy profiles: throughput repeat 1, or the latency phase",
    )
    add("--profile-out", type=Path, default=Path(tempfile.gettempdir()) / "throughput-pyspy.txt")
    add(
        "--cprofile-worker",
        type=Path,
        default=None,
        help="run the worker under cProfile (CPU time) during repeat 1; write pstats here",
    )
    add("--timeout", type=float, default=900.0, help="longest wait for one phase (s)")
    add("--security", choices=("plaintext", "sasl_ssl"), default="plaintext",
        help="the broker's client listener: sasl_ssl starts the launcher's secured broker")  # fmt: skip
    add("--throughput-only", action="store_true", help="skip the latency and ceiling phases")
    add(
        "--compare-security",
        action="store_true",
        help="throughput on plaintext, then on SASL_SSL, and their ratio (implies --throughput-only)",
    )
    args = parser.parse_args(argv)
    # --quick changes the defaults only: --quick --repeats 0 is a quick latency run.
    # A repeat is a backlog of dozens of the worker's steps (10,000 patients: ~120k
    # records, several seconds): over a few steps the 10%→90% rate measures where
    # the step boundaries fall.
    defaults = (4000, 2, 20.0) if args.quick else (10000, 3, 40.0)
    for name, default in zip(("patients", "repeats", "latency_seconds"), defaults, strict=True):
        if getattr(args, name) is None:
            setattr(args, name, default)
    if args.compare_security:
        args.throughput_only = True
    return args


# ----------------------------------------------------------------- programmes


def relabel(records, tag: str):
    """Records of a programme with patient ids prefixed by ``tag`` (programmes
    number their patients from 0, so phases would otherwise share patients)."""
    out = []
    for r in records:
        value = r.value.replace(b'"patient_id":"', b'"patient_id":"' + tag.encode())
        key = tag.encode() + r.key if r.key is not None else None
        out.append(dataclasses.replace(r, key=key, value=value, patient_id=tag + r.patient_id))
    return out


def programme_records(tag: str, patients: int, obs: int, seed: int):
    from cli.programme import build_programme

    programme = build_programme(
        [MEASURE],
        num_patients=patients,
        num_cohorts=20,
        obs_per_patient=obs,
        seed=seed,
        run_id=f"{tag}{seed}",
        alternative_unit_fraction=0.1,
    )
    return programme, relabel(programme.send_order(), tag)


def expected_counts(records) -> dict[str, int]:
    """Readings each patient will have applied (valid ones only)."""
    counts: collections.Counter[str] = collections.Counter()
    for r in records:
        if r.label == "valid":
            counts[r.patient_id] += 1
    return dict(counts)


def fit_posterior(programme, records, models):
    """The population posterior message of the warm-up programme, fitted as the
    population agent would (first fit: fresh SVI)."""
    from model.evidence import stats_from_events
    from streams.patient_state import days
    from streams.population_book import PopulationModel

    valid = [r for r in records if r.label == "valid"]
    patients = sorted({r.patient_id for r in valid})
    index = {p: i for i, p in enumerate(patients)}
    stats = stats_from_events(
        len(patients),
        np.array([index[r.patient_id] for r in valid]),
        np.array([r.exposure for r in valid]),
        np.array([days(r.event_time) for r in valid]),
        np.array([r.canonical_value for r in valid]),
        models[MEASURE],
    )
    truth = programme.truth.patients
    cohorts = sorted({p.cohort for p in truth.values()})
    cohort_index = {c: g for g, c in enumerate(cohorts)}
    tag_len = len(patients[0]) - len(next(iter(truth)))
    cohort = np.array([cohort_index[truth[p[tag_len:]].cohort] for p in patients], dtype=np.int32)
    return PopulationModel(MEASURE, models[MEASURE]).fit(stats, cohort, cohorts)


# ---------------------------------------------------------------------- Kafka


async def create_topics(broker: Settings, prefix: str, partitions: int) -> None:
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    from streams.topics import TOPIC_CONFIG

    admin = AIOKafkaAdminClient(**aiokafka_options(broker))
    await admin.start()
    try:
        await admin.create_topics(
            [NewTopic(prefix + t, partitions, 1, topic_configs=TOPIC_CONFIG.get(t)) for t in TOPICS]
        )
    finally:
        await admin.close()


def producer(broker: Settings, linger_ms: int = 20):
    from aiokafka import AIOKafkaProducer

    return AIOKafkaProducer(
        **aiokafka_options(broker),
        acks="all",
        linger_ms=linger_ms,
        max_batch_size=512 * 1024,
        max_request_size=4 * 1024 * 1024,
    )


async def send_all(prod, prefix: str, records) -> None:
    """Enrolments (acknowledged) first, then the readings, as fast as possible."""
    enrol = [r for r in records if r.topic == "enrollments"]
    rest = [r for r in records if r.topic != "enrollments"]
    for group in (enrol, rest):
        futures = [await prod.send(prefix + r.topic, r.value, key=r.key) for r in group]
        await prod.flush()
        for future in futures:
            await future


class Collector:
    """Reads the worker's scores and population-evidence from the end of the
    topics onwards and keeps, per patient, (Kafka timestamp s, readings applied)."""

    def __init__(self, broker: Settings, prefix: str) -> None:
        self.broker, self.prefix = broker, prefix
        self.evidence: dict[str, list[tuple[float, int]]] = collections.defaultdict(list)
        self.scores: dict[str, list[tuple[float, int]]] = collections.defaultdict(list)
        self.latest: dict[str, int] = {}
        self.last_output = 0.0
        self.task: asyncio.Task | None = None

    async def start(self) -> None:
        from aiokafka import AIOKafkaConsumer, TopicPartition

        self.consumer = AIOKafkaConsumer(
            **aiokafka_options(self.broker),
            enable_auto_commit=False,
            fetch_max_bytes=64 * 1024 * 1024,
            max_partition_fetch_bytes=16 * 1024 * 1024,
            metadata_max_age_ms=1000,  # the topics were created moments ago
        )
        await self.consumer.start()
        parts = []
        for topic in ("scores", "population-evidence"):
            found = None
            while not found:
                await asyncio.sleep(0.2)
                found = self.consumer.partitions_for_topic(self.prefix + topic)
            parts += [TopicPartition(self.prefix + topic, p) for p in found]
        self.consumer.assign(parts)
        await self.consumer.seek_to_beginning(*parts)
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        scores_topic = self.prefix + "scores"
        while True:
            batch = await self.consumer.getmany(timeout_ms=200, max_records=20000)
            for tp, records in batch.items():
                is_score = tp.topic == scores_topic
                for record in records:
                    value = json.loads(record.value)
                    ts = record.timestamp / 1000.0
                    self.last_output = max(self.last_output, ts)
                    if is_score:
                        count = sum(
                            m["count_exposed"] + m["count_unexposed"] for m in value["measures"]
                        )
                        self.scores[value["patient_id"]].append((ts, count))
                    else:  # an EvidenceBatch: the touched patients of one batch
                        for item in value["items"]:
                            count = item["count_exposed"] + item["count_unexposed"]
                            patient = item["patient_id"]
                            self.evidence[patient].append((ts, count))
                            self.latest[patient] = max(self.latest.get(patient, 0), count)

    def complete(self, expected: dict[str, int]) -> bool:
        return all(self.latest.get(p, 0) >= n for p, n in expected.items())

    async def wait(self, expected: dict[str, int], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self.complete(expected):
            if time.monotonic() > deadline:
                done = sum(min(self.latest.get(p, 0), n) for p, n in expected.items())
                raise TimeoutError(f"{done}/{sum(expected.values())} readings processed")
            await asyncio.sleep(0.2)
        await asyncio.sleep(1.0)  # let the batch's scores arrive too

    async def stop(self) -> None:
        if self.task:
            self.task.cancel()
        await self.consumer.stop()


def progress_curve(collector: Collector, patients: set[str]) -> tuple[np.ndarray, np.ndarray]:
    """(times, readings processed by then) from the evidence records."""
    steps = []
    for p in patients:
        previous = 0
        for ts, count in sorted(collector.evidence.get(p, [])):
            if count > previous:
                steps.append((ts, count - previous))
                previous = count
    steps.sort()
    times = np.array([s[0] for s in steps])
    return times, np.cumsum([s[1] for s in steps])


def steady_rate(times: np.ndarray, done: np.ndarray, low=0.1, high=0.9) -> float:
    total = done[-1]
    t_low = times[np.searchsorted(done, low * total)]
    t_high = times[np.searchsorted(done, high * total)]
    return float((high - low) * total / max(t_high - t_low, 1e-9))


# ------------------------------------------------------------------- phases


class StageProbe:
    """The worker's event-loop thread: its CPU (/proc) and the patients agent's
    share of it by stage (``efficacy_step_cpu_seconds_total`` from the worker's
    metrics endpoint), between two snapshots."""

    def __init__(self, worker) -> None:
        self.worker = worker

    def snapshot(self) -> dict[str, float]:
        metrics = scrape_metrics(self.worker.log_text())
        pid = self.worker.process.pid
        stages = {
            stage: metrics.get(f'efficacy_step_cpu_seconds_total{{stage="{stage}"}}', 0.0)
            for stage in STAGES
        }
        return {**stages, "main_thread": cpu_seconds(pid, thread=pid)}

    @staticmethod
    def per_record(before: dict[str, float], after: dict[str, float], records: int) -> dict:
        """µs of the event loop's thread per record, by stage, and outside the
        step (Kafka's clients, faust, the other agents, sending)."""
        spent = {k: after[k] - before[k] for k in after}
        step = sum(spent[stage] for stage in STAGES)
        out = {stage: 1e6 * spent[stage] / records for stage in STAGES}
        out["outside_the_step"] = 1e6 * (spent["main_thread"] - step) / records
        out["main_thread"] = 1e6 * spent["main_thread"] / records
        return out


async def throughput_phase(
    broker, prefix, prod, collector, tag, args, seed, pids, probe: StageProbe
) -> dict:
    _, records = programme_records(tag, args.patients, args.obs_per_patient, seed)
    expected = expected_counts(records)
    cpu_before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    stages_before = probe.snapshot()
    load_before = os.getloadavg()[0]
    started = time.time()
    await send_all(prod, prefix, records)
    produced = time.time()
    await collector.wait(expected, args.timeout)
    cpu = {name: cpu_seconds(pid) - cpu_before[name] for name, pid in pids.items()}
    stages = StageProbe.per_record(stages_before, probe.snapshot(), len(records))
    times, done = progress_curve(collector, set(expected))
    ends = [ts for p in expected for ts, _ in collector.scores.get(p, [])]
    ends += [ts for p in expected for ts, _ in collector.evidence.get(p, [])]
    end = max(ends)
    scores = sum(len(collector.scores.get(p, [])) for p in expected)
    result = {
        "records_produced": len(records),
        "readings": sum(expected.values()),
        "patients": len(expected),
        "produce_seconds": produced - started,
        "produce_rate": len(records) / (produced - started),
        "seconds_first_send_to_last_output": end - started,
        "events_per_s_overall": len(records) / (end - started),
        "events_per_s_steady_10_90": steady_rate(times, done),
        "scores_published": scores,
        "scores_per_reading": scores / sum(expected.values()),
        "evidence_records": sum(len(collector.evidence.get(p, [])) for p in expected),
        # CPU the worker (and the broker) actually got: on a shared machine the
        # rate per worker CPU-second is the steadier number.
        "cpu_seconds": cpu,
        "worker_cpu_share": cpu["worker"] / (end - started),
        "records_per_worker_cpu_s": len(records) / cpu["worker"],
        "worker_main_thread_us_per_record": stages,
        "load_average_1m": [load_before, os.getloadavg()[0]],
    }
    say(
        f"  {tag}: {result['events_per_s_steady_10_90']:,.0f} readings/s steady, "
        f"{result['events_per_s_overall']:,.0f} records/s overall "
        f"({result['records_produced']} records, produced in {result['produce_seconds']:.1f} s); "
        f"worker CPU {cpu['worker']:.1f} s = {result['records_per_worker_cpu_s']:,.0f} records/CPU-s"
    )
    say(f"  {tag}: event loop µs a record: {stage_line(stages)}")
    return result


def stage_line(stages: dict[str, float]) -> str:
    return ", ".join(f"{name} {value:.1f}" for name, value in stages.items())


async def latency_phase(
    broker, prefix, prod, collector, rate: float, args, probe: StageProbe
) -> dict:
    obs = args.latency_obs_per_patient
    readings_wanted = max(int(rate * args.latency_seconds), 200)
    patients = max(readings_wanted // obs, 20)
    _, records = programme_records("l-", patients, obs, seed=7)
    enrol = [r for r in records if r.topic == "enrollments"]
    readings = [r for r in records if r.topic != "enrollments"][:readings_wanted]
    await send_all(prod, prefix, enrol)
    await asyncio.sleep(max(3.0, 3 * len(enrol) / rate))  # enrolments processed
    stages_before = probe.snapshot()
    position: collections.Counter[str] = collections.Counter()
    sent: list[tuple[str, int, float]] = []  # (patient, k, send wall time)
    futures = []
    start = time.time()
    for i, r in enumerate(readings):
        target = start + i / rate
        delay = target - time.time()
        if delay > 0.002:
            await asyncio.sleep(delay)
        if r.label == "valid":
            position[r.patient_id] += 1
        futures.append(await prod.send(prefix + r.topic, r.value, key=r.key))
        if r.label == "valid":
            sent.append((r.patient_id, position[r.patient_id], time.time()))
    send_seconds = time.time() - start
    await prod.flush()
    for future in futures:
        await future
    expected = dict(position)
    await collector.wait(expected, args.timeout)
    stages = StageProbe.per_record(stages_before, probe.snapshot(), len(readings))
    to_score, to_evidence, unpublished = [], [], 0
    for patient, k, t_sent in sent:
        evidence = sorted(collector.evidence[patient])
        e_ts, e_count = next((ts, c) for ts, c in evidence if c >= k)
        to_evidence.append(e_ts - t_sent)
        score = next(
            ((ts, c) for ts, c in sorted(collector.scores.get(patient, [])) if c >= k), None
        )
        if score is not None and score[1] == e_count:
            to_score.append(score[0] - t_sent)
        else:
            unpublished += 1
    score_lat = np.array(to_score)
    ev_lat = np.array(to_evidence)
    # Processed latency over the phase, by tenth of the readings in send order:
    # growing means a backlog (the worker is slower than the rate), flat a delay.
    tenths = [float(np.median(part)) for part in np.array_split(ev_lat, 10) if part.size]
    result = {
        "target_rate": rate,
        "achieved_send_rate": len(readings) / send_seconds,
        "readings": len(sent),
        "patients": patients,
        "obs_per_patient": obs,
        "readings_with_own_score": int(score_lat.size),
        "fraction_without_own_score": unpublished / max(len(sent), 1),
        "p50_latency_s": float(np.quantile(score_lat, 0.5)),
        "p90_latency_s": float(np.quantile(score_lat, 0.9)),
        "p99_latency_s": float(np.quantile(score_lat, 0.99)),
        "max_latency_s": float(score_lat.max()),
        "processed_p50_latency_s": float(np.quantile(ev_lat, 0.5)),
        "processed_p99_latency_s": float(np.quantile(ev_lat, 0.99)),
        "processed_median_latency_by_tenth_s": tenths,
        "worker_main_thread_us_per_record": stages,
    }
    say(
        f"  latency at {rate:,.0f}/s: p50 {result['p50_latency_s']:.3f} s, "
        f"p99 {result['p99_latency_s']:.3f} s ({score_lat.size} readings with their own score, "
        f"{unpublished} without); processed median by tenth of the phase: "
        + " ".join(f"{t:.2f}" for t in tenths)
    )
    say(f"  event loop µs a reading: {stage_line(stages)}")
    return result


async def raw_consume(broker: Settings, prefix: str, validate: bool) -> tuple[int, float]:
    """Read every record of the raw topics from the beginning; parse each value."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    from streams.schemas import ENROLLMENT_EVENT, WearableReading

    consumer = AIOKafkaConsumer(
        **aiokafka_options(broker),
        enable_auto_commit=False,
        fetch_max_bytes=64 * 1024 * 1024,
        max_partition_fetch_bytes=16 * 1024 * 1024,
        metadata_max_age_ms=1000,
    )
    await consumer.start()
    try:
        parts = []
        for topic in ("enrollments", "wearables"):
            found = None
            while not found:
                await asyncio.sleep(0.2)
                found = consumer.partitions_for_topic(prefix + topic)
            parts += [TopicPartition(prefix + topic, p) for p in found]
        consumer.assign(parts)
        await consumer.seek_to_beginning(*parts)
        end = await consumer.end_offsets(parts)
        total = sum(end.values())
        seen = 0
        started = time.perf_counter()
        while seen < total:
            batch = await consumer.getmany(timeout_ms=500, max_records=50000)
            for tp, records in batch.items():
                enrol = tp.topic.endswith("enrollments")
                for record in records:
                    if validate:
                        if enrol:
                            ENROLLMENT_EVENT.validate_json(record.value)
                        else:
                            WearableReading.model_validate_json(record.value)
                    else:
                        json.loads(record.value)
                seen += len(records)
        return seen, time.perf_counter() - started
    finally:
        await consumer.stop()


def faust_consume(
    bootstrap: str, prefix: str, partitions: int, records: int, chunked: bool = False
) -> dict:
    """benchmarks.faust_ceiling in a subprocess on the raw topics of this run
    (``records``: how many they hold); ``chunked``: by partition chunk."""
    topics = ",".join(prefix + t for t in ("enrollments", "wearables"))
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.faust_ceiling", "--bootstrap", bootstrap,
         "--topics", topics, "--expect", str(records), "--partitions", str(partitions),
         *(["--chunked"] if chunked else [])],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    # faust's worker sends what the agent prints to its log (stderr)
    found = re.findall(r'\{"events": .*\}', done.stdout + done.stderr)
    if not found:
        raise RuntimeError(f"faust ceiling run failed: {done.stderr[-2000:]}")
    return json.loads(found[-1])


async def wait_until_quiet(pid: int, limit: float = 300.0) -> float:
    """Wait until the worker uses < 20% of a core (the population agent may still
    be consuming the evidence of the last phase). Returns the seconds waited."""
    started = time.monotonic()
    while time.monotonic() - started < limit:
        before = cpu_seconds(pid)
        await asyncio.sleep(2.0)
        if cpu_seconds(pid) - before < 0.4:
            break
    return time.monotonic() - started


def start_py_spy(executable: str, pid: int, out: Path, seconds: float) -> subprocess.Popen:
    return subprocess.Popen(
        [executable, "record", "--pid", str(pid), "--rate", "200", "--format", "raw",
         "--duration", str(int(seconds)), "--output", str(out), "--nonblocking"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip


# --------------------------------------------------------------------- main


async def run(args: argparse.Namespace, bootstrap: str, kafka) -> dict:
    """One run on ``kafka`` (a LocalKafka, or None: the plaintext broker at ``bootstrap``)."""
    from cli.broker import create_acls, worker_acls
    from cli.worker_process import WorkerProcess
    from streams.app import measure_models
    from streams.catalogue import Catalogue

    where = machine()
    run_id = uuid.uuid4().hex[:8]
    prefix = f"tp-{run_id}."
    data_dir = tempfile.mkdtemp(prefix="throughput-faust-")
    kafka_pid = kafka.process.pid if kafka is not None else None
    secured = kafka is not None and kafka.security != "PLAINTEXT"
    # this process's clients (admin on a secured broker), and the worker's connection
    broker = kafka.client_settings() if kafka is not None else Settings(bootstrap_servers=bootstrap)
    if secured:
        await create_acls(broker, worker_acls("worker", prefix, f"tp-{run_id}"))
    env = {
        **(kafka.client_env("worker") if secured else {"EFFICACY_BOOTSTRAP_SERVERS": bootstrap}),
        "EFFICACY_TOPIC_PREFIX": prefix,
        "EFFICACY_APP_ID": f"tp-{run_id}",
        "EFFICACY_PARTITIONS": str(args.partitions),
        "EFFICACY_WEB_ENABLED": "false",
        "EFFICACY_METRICS_PORT": "0",
        "EFFICACY_DATA_DIR": data_dir,
        "EFFICACY_POPULATION_INTERVAL_SECONDS": "3600",
    }
    settings = Settings(**{"bootstrap_servers": bootstrap, "topic_prefix": prefix})
    models = measure_models(Catalogue.load(), settings)
    await create_topics(broker, prefix, args.partitions)

    say("fitting the warm-up programme's population posterior (JAX compile + SVI)")
    warm_programme, warm = programme_records("w-", args.warm_patients, 20, seed=1)
    fit = fit_posterior(warm_programme, warm, models)
    prod = producer(broker)
    await prod.start()
    await prod.send_and_wait(
        prefix + "population-posterior",
        fit.message.model_dump_json().encode(),
        key=MEASURE.encode(),
    )
    collector = Collector(broker, prefix)
    await collector.start()
    result: dict = {}
    worker_class = WorkerProcess
    if args.cprofile_worker:
        env["EFFICACY_PROFILE_OUT"] = str(args.cprofile_worker)

        class ProfiledWorker(WorkerProcess):
            def start(self) -> None:
                with self.log_path.open("wb") as log:
                    self.process = subprocess.Popen(
                        [sys.executable, "-m", "benchmarks.profiled_worker"],
                        env=self.env,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        stdin=subprocess.DEVNULL,
                    )

        worker_class = ProfiledWorker
    with worker_class(env) as worker:
        say(f"worker pid {worker.process.pid}; warm-up: {len(warm)} records")
        await send_all(prod, prefix, warm)
        await collector.wait(expected_counts(warm), args.timeout)
        # The worker compiles its scoring shapes in a thread once the posterior
        # arrives; measured repeats start after that, so they compare steady states.
        await asyncio.to_thread(worker.wait_for_log, "compiled scoring for", 1, args.timeout)
        assert worker.alive(), worker.log_tail()
        pids = {"worker": worker.process.pid}
        probe = StageProbe(worker)
        if kafka_pid:
            pids["broker"] = kafka_pid
        say("throughput")
        repeats = []
        profiled = None
        for repeat in range(args.repeats + (1 if args.cprofile_worker else 0)):
            profiling = bool(args.cprofile_worker) and repeat == args.repeats
            spy = None
            if profiling:
                os.kill(worker.process.pid, signal.SIGRTMIN + 1)
            if args.py_spy and args.py_spy_phase == "throughput" and repeat == 0:
                expected_s = args.patients * args.obs_per_patient / 400.0
                spy = start_py_spy(args.py_spy, worker.process.pid, args.profile_out, expected_s)
            phase = await throughput_phase(
                broker, prefix, prod, collector, f"m{repeat}-", args, 100 + repeat, pids, probe
            )
            if profiling:  # an extra repeat, slowed by cProfile: not in the medians
                os.kill(worker.process.pid, signal.SIGRTMIN + 2)
                profiled = phase
            else:
                repeats.append(phase)
            if spy is not None:  # py-spy writes its output on SIGINT, not on SIGTERM
                spy.send_signal(signal.SIGINT)
                spy.wait(timeout=30)
        if repeats:
            rate = median([r["events_per_s_steady_10_90"] for r in repeats])
        else:  # --repeats 0: a latency run at --latency-rate readings/s
            rate = 2 * args.latency_rate
        if args.throughput_only:
            assert worker.alive(), worker.log_tail()
            await collector.stop()
            await prod.stop()
            return {
                "security": kafka.security if kafka is not None else "PLAINTEXT",
                "events_per_s": rate,
                "events_per_s_overall": median([r["events_per_s_overall"] for r in repeats]),
                "records_per_worker_cpu_s": median(
                    [r["records_per_worker_cpu_s"] for r in repeats]
                ),
                "parameters": {
                    "partitions": args.partitions,
                    "patients_per_repeat": args.patients,
                    "obs_per_patient": args.obs_per_patient,
                    "repeats": args.repeats,
                },
                "throughput_repeats": repeats,
                "worker_log_tail": worker.log_tail(20),
                "machine": where,
            }
        quiet = await wait_until_quiet(worker.process.pid)
        say(f"latency at half the sustained rate (worker quiet after {quiet:.0f} s)")
        spy = None
        if args.py_spy and args.py_spy_phase == "latency":
            spy = start_py_spy(
                args.py_spy, worker.process.pid, args.profile_out, args.latency_seconds
            )
        latency = await latency_phase(broker, prefix, prod, collector, rate / 2, args, probe)
        if spy is not None:
            spy.wait(timeout=60)
        assert worker.alive(), worker.log_tail()
        worker_log = worker.log_tail(20)
    await collector.stop()
    await prod.stop()

    say("ceiling: plain consume + parse of the raw topics (worker stopped)")
    plain, validated = [], []
    for _ in range(3):
        count, seconds = await raw_consume(broker, prefix, validate=False)
        plain.append(count / seconds)
        count, seconds = await raw_consume(broker, prefix, validate=True)
        validated.append(count / seconds)
    say(
        f"  json.loads {median(plain):,.0f}/s, pydantic {median(validated):,.0f}/s ({count} records)"
    )
    say("ceiling: a bare faust agent (take_events + json.loads) on the same raw topics")
    faust_runs, chunked_runs = [], []
    for _ in range(3 if not secured else 0):  # paired: stock and chunked delivery alternate
        faust_runs.append(faust_consume(bootstrap, prefix, args.partitions, count))
        chunked_runs.append(faust_consume(bootstrap, prefix, args.partitions, count, True))
    # (benchmarks.faust_ceiling connects in plaintext only: no faust ceiling when secured)
    faust_rate = median([r["events_per_s"] for r in faust_runs]) if faust_runs else float("nan")
    chunked_rate = (
        median([r["events_per_s"] for r in chunked_runs]) if chunked_runs else float("nan")
    )
    say(f"  faust agent {faust_rate:,.0f}/s; by partition chunk {chunked_rate:,.0f}/s")

    result.update(
        events_per_s=rate,
        events_per_s_overall=median([r["events_per_s_overall"] for r in repeats])
        if repeats
        else None,
        records_per_worker_cpu_s=median([r["records_per_worker_cpu_s"] for r in repeats])
        if repeats
        else None,
        raw_consume_events_per_s=median(plain),
        raw_consume_validate_events_per_s=median(validated),
        ratio_to_raw_consume=rate / median(plain),
        faust_consume_events_per_s=faust_rate,
        ratio_to_faust_consume=rate / faust_rate,
        faust_consume_repeats=faust_runs,
        faust_chunked_consume_events_per_s=chunked_rate,
        faust_chunked_consume_repeats=chunked_runs,
        p50_latency_s=latency["p50_latency_s"],
        p99_latency_s=latency["p99_latency_s"],
        goal={"events_per_s": 50000, "p99_latency_s": 1.0},
        parameters={
            "measure": MEASURE,
            "partitions": args.partitions,
            "patients_per_repeat": args.patients,
            "obs_per_patient": args.obs_per_patient,
            "repeats": args.repeats,
            "warm_patients": args.warm_patients,
            "latency_seconds": args.latency_seconds,
            "latency_obs_per_patient": args.latency_obs_per_patient,
            "worker_batch_size": settings.batch_size,
            "worker_batch_seconds": settings.batch_seconds,
            "store": settings.store_url,
            "population_interval_seconds": 3600,
            "producer": "aiokafka, acks=all, linger 20 ms",
            "broker": "configured" if kafka is None else "local",
            "security": kafka.security if kafka is not None else "PLAINTEXT",
        },
        throughput_repeats=repeats,
        profiled_repeat=profiled,
        cprofile_worker=str(args.cprofile_worker) if args.cprofile_worker else None,
        latency=latency,
        raw_consume_repeats=plain,
        raw_consume_validate_repeats=validated,
        raw_consume_records=count,
        worker_log_tail=worker_log,
        machine=where,
    )
    return result


def run_on(args: argparse.Namespace, security: str) -> dict:
    """``run`` on the configured broker (plaintext only) or a local one started for it."""
    bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS") if security == "PLAINTEXT" else None
    if bootstrap:
        return asyncio.run(run(args, bootstrap, None))
    from cli.broker import LocalKafka

    kafka = LocalKafka(
        log=say, security=security, users=["worker"] if security != "PLAINTEXT" else []
    )
    bootstrap = kafka.start()
    try:
        return asyncio.run(run(args, bootstrap, kafka))
    finally:
        kafka.stop()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.compare_security:
        runs = {}
        for security in ("PLAINTEXT", "SASL_SSL"):
            say(f"--- {security}")
            runs[security] = run_on(args, security)
        ratio = runs["SASL_SSL"]["events_per_s"] / runs["PLAINTEXT"]["events_per_s"]
        cpu_ratio = (
            runs["SASL_SSL"]["records_per_worker_cpu_s"]
            / runs["PLAINTEXT"]["records_per_worker_cpu_s"]
        )
        say(
            f"SASL_SSL {runs['SASL_SSL']['events_per_s']:,.0f} readings/s vs plaintext "
            f"{runs['PLAINTEXT']['events_per_s']:,.0f}: ratio {ratio:.2f} "
            f"(records per worker CPU-s: ratio {cpu_ratio:.2f})"
        )
        result = {"sasl_ssl_to_plaintext": ratio, "per_worker_cpu_s_ratio": cpu_ratio, **runs}
        say(f"wrote {write_json('throughput_security', result)}")
        return 0
    result = run_on(args, args.security.upper())
    name = "throughput_quick" if args.quick else "throughput"
    if args.security != "plaintext":
        name += f"_{args.security}"
    path = write_json(name if args.repeats else "throughput_latency", result)
    say(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
