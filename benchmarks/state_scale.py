"""What a worker holding 1M patients across 3 measures costs, from parts (issue 6).

    python -m benchmarks.state_scale            # ~2 min -> results/state_scale.json

Running 1M patients end to end through Kafka does not fit a session on two shared
cores, so this measures the parts and extrapolates, saying which is which:

1. The size of a patient's table value (``PatientRecord`` JSON) with 3 measures,
   built by the real ``apply_event`` from a simulated programme's validated events,
   at several numbers of readings per measure, and what it is made of.
2. RocksDB through rocksdict with faust's own options (``faust.stores.rocksdb``
   ``RocksDBOptions``, 4 partition databases, raw mode): the rate of changelog
   recovery's write path (``WriteBatch`` of 1000 puts, as
   ``Store.apply_changelog_batch``), of random point reads, the size on disk, and
   this process's resident memory, for ``--records`` records of the measured size.
3. The JSON parse rates recovery and rescoring pay per record: ``PatientRecord``
   (patients table) and ``PatientEvidence`` (the population agent rebuilds its
   arrays from its table after a restart).

The population update time at 1M patients is in results/population_cost.json
(measured, not extrapolated); this script copies it into its output.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from benchmarks.common import (
    RESULTS,
    loop_lag,
    machine,
    say,
    scrape_metrics,
    timer_drift_max,
    write_json,
)
from streams.kafka_options import aiokafka_options

MEASURES = ["resting_heart_rate", "hba1c", "phq9"]


def rss_mb() -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def simulated_records(patients: int, readings: int, seed: int) -> dict:
    """PatientRecords (3 measures) built by the real ``apply_event`` from a
    simulated programme's validated events, keyed by patient id."""
    from cli.programme import build_programme
    from streams.app import measure_models
    from streams.catalogue import Catalogue
    from streams.patient_state import PatientRecord, apply_event
    from streams.schemas import Origin
    from streams.settings import Settings
    from streams.validation import validate_enrollment, validate_observation

    catalogue = Catalogue.load()
    settings = Settings(max_age_days=36500.0)
    models = measure_models(catalogue, settings)
    span = max(90.0, readings / 2.0)
    programme = build_programme(
        MEASURES, num_patients=patients, num_cohorts=5, obs_per_patient=readings, seed=seed,
        time_span=span, start=datetime.now(UTC) - timedelta(days=2.0 * span),
    )  # fmt: skip
    records: dict[str, PatientRecord] = {}
    for offset, raw in enumerate(programme.send_order()):
        origin = Origin(topic=f"efficacy.{raw.topic}", partition=offset % 4, offset=offset)
        if raw.topic == "enrollments":
            event = validate_enrollment(raw.key, raw.value, origin, settings)
        else:
            event = validate_observation(raw.topic, raw.key, raw.value, origin, catalogue, settings)
        record, _ = apply_event(records.get(event.patient_id), event, models)
        records[event.patient_id] = record
    return records


def record_sizes(readings_per_measure: list[int], patients: int = 20) -> dict:
    """JSON size of PatientRecords built by apply_event (median over patients)."""
    out = {}
    for n in readings_per_measure:
        records = simulated_records(patients, n, seed=5)
        sizes = [len(r.model_dump_json()) for r in records.values()]
        one = statistics.median_low(sizes)
        sample = next(r for r in records.values() if len(r.model_dump_json()) == one)
        parts = {
            "seen": len(sample.model_dump_json(include={"seen_index", "seen_partitions"})),
            "recent": sum(len(json.dumps(m.recent)) for m in sample.measures.values()),
            "measures_without_recent": sum(
                len(m.model_dump_json(exclude={"recent"})) for m in sample.measures.values()
            ),
        }
        out[str(n)] = {
            "readings_per_measure": n,
            "event_ids_kept": len(sample.seen_origins()),
            "record_bytes_median": one,
            "record_bytes_max": max(sizes),
            "bytes_by_part": parts,
            "recent_readings_kept": {k: len(m.recent) for k, m in sample.measures.items()},
            "sample": sample.model_dump_json() if n == readings_per_measure[0] else None,
        }
        say(f"  {n} readings/measure: record {one:,} bytes ({parts})")
    return out


def rocksdb_rates(records: int, value_bytes: int, partitions: int = 4) -> dict:
    import rocksdict
    from faust.stores.rocksdb import RocksDBOptions

    options = RocksDBOptions(use_rocksdict=True)
    folder = Path(tempfile.mkdtemp(prefix="state-scale-rocksdb-"))
    rss_before = rss_mb()
    try:
        dbs = [options.open(folder / f"patients-{p}.db") for p in range(partitions)]
        rng = random.Random(0)
        # Values of the measured size; varied bytes so compression is not flattering
        # (JSON of floats compresses ~2x in practice; we do not count on it).
        base = bytes(rng.getrandbits(8) for _ in range(value_bytes))
        keys = [f'"patient-{i:07d}"'.encode() for i in range(records)]
        started = time.perf_counter()
        for start in range(0, records, 1000):
            batches = [rocksdict.WriteBatch(raw_mode=True) for _ in range(partitions)]
            for i in range(start, min(start + 1000, records)):
                value = i.to_bytes(8, "little") + base[8:]
                batches[i % partitions].put(keys[i], value)
            for db, batch in zip(dbs, batches, strict=True):
                db.write(batch)
        for db in dbs:
            db.flush()
        write_seconds = time.perf_counter() - started
        rss_after_write = rss_mb()
        probe = rng.sample(range(records), min(records, 100_000))
        started = time.perf_counter()
        for i in probe:
            value = dbs[i % partitions].get(keys[i])
            assert value is not None
        read_seconds = time.perf_counter() - started
        for db in dbs:
            db.close()
        disk = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return {
        "records": records,
        "value_bytes": value_bytes,
        "partitions": partitions,
        "write_records_per_s": records / write_seconds,
        "write_mb_per_s": records * value_bytes / write_seconds / 1e6,
        "random_reads_per_s": len(probe) / read_seconds,
        "disk_bytes": disk,
        "disk_bytes_per_record": disk / records,
        "rss_growth_mb": rss_after_write - rss_before,
        "options": {
            "write_buffer_size": options.write_buffer_size,
            "max_write_buffer_number": options.max_write_buffer_number,
            "block_cache_size": options.block_cache_size,
        },
    }


def parse_rates(sample_json: str, repeats: int = 20000) -> dict:
    from streams.patient_state import PatientRecord
    from streams.schemas import PatientEvidence

    record = PatientRecord.model_validate_json(sample_json)
    stats = next(iter(record.measures.values()))
    evidence = PatientEvidence(
        measure="resting_heart_rate",
        patient_id=record.patient_id,
        cohort=record.cohort or "clinic-00",
        gram=stats.gram,  # packed, as the worker writes it
        reference_time=stats.reference_time,
        count_exposed=stats.count_exposed,
        count_unexposed=stats.count_unexposed,
    ).model_dump_json()
    out = {}
    for name, parse, text in (
        ("patient_record", PatientRecord.model_validate_json, sample_json),
        ("patient_evidence", PatientEvidence.model_validate_json, evidence),
    ):
        n = max(repeats // 10, 1000) if name == "patient_record" else repeats
        started = time.perf_counter()
        for _ in range(n):
            parse(text)
        out[f"{name}_parse_per_s"] = n / (time.perf_counter() - started)
        out[f"{name}_bytes"] = len(text)
    return out


# ---------------------------------------------------------------- end to end
#
# python -m benchmarks.state_scale --end-to-end --patients 1000000
#
# The worker's state is written straight into the changelog topics it recovers
# from (pushing events through the pipeline at ~200 records per CPU-second would
# take days at 1M patients); then a real ``efficacy worker`` with the RocksDB
# store recovers it, fits the population, and is restarted twice.


@dataclass
class Template:
    """A PatientRecord built by apply_event, and the PatientEvidence the patients
    agent forwards for each of its measures, as plain JSON values to clone."""

    record: str  # PatientRecord JSON
    evidence: dict[str, str]  # measure -> PatientEvidence JSON


def make_templates(count: int, readings: int, seed: int = 7) -> list[Template]:
    """``count`` enrolled patients of a simulated programme (3 measures,
    ``readings`` per measure), through the real validation and ``apply_event``;
    their evidence as the patients agent forwards it (``patient_evidence``)."""
    from streams.app import measure_models
    from streams.catalogue import Catalogue
    from streams.patient_state import patient_evidence
    from streams.settings import Settings

    models = measure_models(Catalogue.load(), Settings())
    templates = []
    for record in simulated_records(count, readings, seed).values():
        assert record.cohort is not None and set(record.measures) == set(MEASURES)
        evidence = {
            measure: patient_evidence(record, measure, models[measure]).model_dump_json()
            for measure in record.measures
        }
        templates.append(Template(record.model_dump_json(), evidence))
    return templates


def transform_gram(gram: list[list[float]] | None, a: float, b: float) -> list | None:
    """The Gram matrix of the same readings with y -> a·y + b (standardised units):
    G' = T G Tᵀ for the linear map T of (1, x.., y) -> (1, x.., a·y + b). Still a
    valid (PSD) statistic, counts unchanged, but every float different."""
    if gram is None:
        return None
    d = len(gram)
    y = d - 1
    out = [row[:] for row in gram]
    for j in range(y):
        out[y][j] = out[j][y] = a * gram[y][j] + b * gram[0][j]
    out[y][y] = a * a * gram[y][y] + 2 * a * b * gram[y][0] + b * b * gram[0][0]
    return out


def transform_packed(gram: str | None, a: float, b: float) -> str | None:
    """``transform_gram`` of a Gram matrix as the worker writes it in records
    and evidence (model.evidence.packed: float64 bytes, URL-safe base64)."""
    if gram is None:
        return None
    from base64 import urlsafe_b64decode, urlsafe_b64encode

    import numpy as np

    from model.evidence import packed

    values = np.frombuffer(urlsafe_b64decode(gram), dtype="<f8")
    d = round(values.size**0.5)
    out = transform_gram(values.reshape(d, d).tolist(), a, b)
    return urlsafe_b64encode(packed(np.asarray(out))).decode()


class Cloner:
    """New patients from the templates: new id, cohort, event ids and origins in
    the idempotency index, and statistics perturbed (y -> a·y + b per patient, the
    recent raw readings scaled), so RocksDB and Kafka see realistic bytes."""

    def __init__(self, templates: list[Template], cohorts: int, partitions: int, seed: int):
        self.templates = [
            (t.record, {m: json.loads(e) for m, e in t.evidence.items()}) for t in templates
        ]
        self.cohorts = cohorts
        self.partitions = partitions
        self.rng = random.Random(seed)
        self.offsets = [0] * partitions  # next offset per source partition

    def clone(self, index: int) -> tuple[str, int, str, dict[str, str]]:
        """(patient id, its partition, record JSON, measure -> evidence JSON)."""
        from base64 import urlsafe_b64decode as b64decode
        from base64 import urlsafe_b64encode as b64encode

        from streams.partitioning import key_partition
        from streams.patient_state import SEEN_ENTRY, event_digest

        record, evidence = self.templates[index % len(self.templates)]
        record = json.loads(record)  # a fresh copy
        patient_id = f"patient-{index:07d}"
        partition = key_partition(patient_id.encode(), self.partitions)
        cohort = f"clinic-{self.rng.randrange(self.cohorts):03d}"
        a = self.rng.lognormvariate(0.0, 0.15)
        b = self.rng.gauss(0.0, 0.3)
        record["patient_id"], record["cohort"] = patient_id, cohort
        start = self.offsets[partition]
        topics = [p.split(":", 1)[0] for p in record["seen_partitions"]]
        where = {topic: k for k, topic in enumerate(dict.fromkeys(topics))}
        entries = []
        for j, (_, k, _) in enumerate(SEEN_ENTRY.iter_unpack(b64decode(record["seen_index"]))):
            digest = event_digest(f"{index:07d}-{j:04d}")
            entries.append(SEEN_ENTRY.pack(digest, where[topics[k]], start + 7 * j))
        self.offsets[partition] = start + 7 * len(entries)
        record["seen_partitions"] = [f"{topic}:{partition}" for topic in where]
        record["seen_index"] = b64encode(b"".join(entries)).decode()
        for stats in record["measures"].values():
            for name in ("gram", "sealed_gram", "sealed_window_gram", "window_gram"):
                stats[name] = transform_packed(stats.get(name), a, b)
            stats["recent"] = [[t, v * (1.0 + 0.05 * (a - 1.0))] for t, v in stats["recent"]]
        values = {}
        for measure, template in evidence.items():
            value = dict(template, patient_id=patient_id, cohort=cohort)
            value["gram"] = transform_packed(template["gram"], a, b)
            value["recent_gram"] = transform_packed(template.get("recent_gram"), a, b)
            values[measure] = dumps(value)
        return patient_id, partition, dumps(record), values


def dumps(value) -> str:
    """Compact JSON as pydantic writes it (the same bytes for a template)."""
    return json.dumps(value, separators=(",", ":"))


async def produce_state(
    bootstrap: str,
    app_id: str,
    partitions: int,
    cloner: Cloner,
    patients: int,
    probe: set[int],
    written: dict[int, str],
) -> dict:
    """Write ``patients`` patients into the changelog topics of the worker's two
    tables: ``{app_id}-patients-changelog`` (key: the patient id as JSON, faust's
    serializer for ``key_type=str``; value: the record bytes; partition: murmur2
    of the raw id, KeyPartitionedTable) and ``{app_id}-population-evidence-
    changelog`` (key ``"measure/patient id"`` as JSON; partition: the measure's
    evidence partition under the shipped catalogue the worker runs,
    streams.partitioning.EvidencePartitions, where the population agent's table
    puts it)."""
    from aiokafka import AIOKafkaProducer
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    from streams.catalogue import Catalogue
    from streams.partitioning import EvidencePartitions

    patients_topic = f"{app_id}-patients-changelog"
    evidence_topic = f"{app_id}-population-evidence-changelog"
    admin = AIOKafkaAdminClient(**aiokafka_options(bootstrap))
    await admin.start()
    try:  # as faust declares a table's changelog: the table's partitions, compacted
        await admin.create_topics(
            [
                NewTopic(name, partitions, 1, topic_configs={"cleanup.policy": "compact"})
                for name in (patients_topic, evidence_topic)
            ]
        )
    finally:
        await admin.close()
    producer = AIOKafkaProducer(
        **aiokafka_options(bootstrap),
        acks=1,
        linger_ms=50,
        max_batch_size=1024 * 1024,
        max_request_size=8 * 1024 * 1024,
        compression_type=None,
    )
    await producer.start()
    evidence_partition = EvidencePartitions.of(Catalogue.load(), partitions)
    measure_partitions = {m: evidence_partition(m) for m in MEASURES}
    record_bytes = evidence_bytes = 0
    started = last = time.perf_counter()
    pending = []
    try:
        for index in range(patients):
            patient_id, partition, record, evidence = cloner.clone(index)
            if index in probe:
                written[index] = record
            value = record.encode()
            record_bytes += len(value)
            pending.append(
                await producer.send(
                    patients_topic, value, key=dumps(patient_id).encode(), partition=partition
                )
            )
            for measure, text in evidence.items():
                value = text.encode()
                evidence_bytes += len(value)
                pending.append(
                    await producer.send(
                        evidence_topic,
                        value,
                        key=dumps(f"{measure}/{patient_id}").encode(),
                        partition=measure_partitions[measure],
                    )
                )
            if len(pending) >= 20_000:
                await asyncio.gather(*pending)
                pending = []
            now = time.perf_counter()
            if now - last > 10.0:
                last = now
                rate = (index + 1) / (now - started)
                say(
                    f"  produced {index + 1:,} patients ({record_bytes / 1e9:.2f} GB records, "
                    f"{evidence_bytes / 1e9:.2f} GB evidence), {rate:,.0f} patients/s"
                )
        await asyncio.gather(*pending)
        await producer.flush()
    finally:
        await producer.stop()
    seconds = time.perf_counter() - started
    return {
        "patients_topic": patients_topic,
        "evidence_topic": evidence_topic,
        "patients": patients,
        "evidence_records": patients * len(MEASURES),
        "record_bytes": record_bytes,
        "evidence_bytes": evidence_bytes,
        "record_bytes_mean": record_bytes / patients,
        "evidence_bytes_mean": evidence_bytes / (patients * len(MEASURES)),
        "seconds": seconds,
        "patients_per_s": patients / seconds,
        "evidence_partitions": measure_partitions,
    }


async def send_evidence_updates(
    bootstrap: str, prefix: str, partitions: int, cloner: Cloner, indices: list[int]
) -> dict:
    """New statistics for the patients ``indices`` on the population-evidence
    topic, as the patients agent forwards them (EvidenceBatch messages of up to
    EVIDENCE_CHUNK patients, keyed by measure, on the measure's evidence
    partition under the shipped catalogue the worker runs): the population
    agent's next tick is a warm update."""
    from aiokafka import AIOKafkaProducer

    from streams.catalogue import Catalogue
    from streams.partitioning import EvidencePartitions
    from streams.patient_step import EVIDENCE_CHUNK
    from streams.schemas import EvidenceBatch, PatientEvidence

    evidence_partition = EvidencePartitions.of(Catalogue.load(), partitions)
    by_measure: dict[str, list[PatientEvidence]] = {}
    for index in indices:
        _, _, _, evidence = cloner.clone(index)  # new a, b: new statistics
        for measure, text in evidence.items():
            by_measure.setdefault(measure, []).append(PatientEvidence.model_validate_json(text))
    producer = AIOKafkaProducer(
        **aiokafka_options(bootstrap), acks=1, linger_ms=20, max_request_size=16 * 1024 * 1024
    )
    await producer.start()
    started = time.perf_counter()
    try:
        pending = []
        for measure, items in by_measure.items():
            for start in range(0, len(items), EVIDENCE_CHUNK):
                batch = EvidenceBatch(measure=measure, items=items[start : start + EVIDENCE_CHUNK])
                pending.append(
                    await producer.send(
                        f"{prefix}population-evidence",
                        batch.model_dump_json().encode(),
                        key=measure.encode(),
                        partition=evidence_partition(measure),
                    )
                )
        await asyncio.gather(*pending)
    finally:
        await producer.stop()
    return {
        "patients": len(indices),
        "messages": len(pending),
        "seconds": time.perf_counter() - started,
    }


async def seed_posteriors(
    bootstrap: str, prefix: str, templates: list[Template], patients: int, cohorts: int
) -> dict:
    """Each measure's population posterior fitted here, as the population agent
    fits a first one (fresh SVI, the worker's model), on ``patients`` clones of
    the templates (another draw of the same population), and published on the
    posterior topic: a worker that starts on the cloned state continues from it
    (a warm update) instead of a cold fit of the whole population. What the
    restarts measure does not change: they continue from what the worker
    itself published."""
    from aiokafka import AIOKafkaProducer

    from streams.app import measure_models
    from streams.catalogue import Catalogue
    from streams.population_book import PopulationBook, PopulationModel
    from streams.schemas import PatientEvidence
    from streams.settings import Settings

    models = measure_models(Catalogue.load(), Settings())
    cloner = Cloner(templates, cohorts, 1, seed=23)
    items: dict[str, list[PatientEvidence]] = {measure: [] for measure in MEASURES}
    for index in range(patients):
        _, _, _, evidence = cloner.clone(index)
        for measure, text in evidence.items():
            items[measure].append(PatientEvidence.model_validate_json(text))
    books = {measure: PopulationBook(measure, models[measure]) for measure in MEASURES}
    for measure, book in books.items():
        book.put_many(items[measure])
    producer = AIOKafkaProducer(
        **aiokafka_options(bootstrap), acks="all", max_request_size=16 * 1024 * 1024
    )
    await producer.start()
    fits = {}
    try:
        for measure, book in books.items():
            started = time.perf_counter()
            stats, cohort, names = book.snapshot()
            result = PopulationModel(measure, models[measure]).fit(
                stats, cohort, names, book.covariates_snapshot(), book.groups_snapshot()
            )
            await producer.send_and_wait(
                f"{prefix}population-posterior",
                result.message.model_dump_json().encode(),
                key=measure.encode(),
            )
            fits[measure] = {
                "seconds": time.perf_counter() - started,
                "patients": book.num_patients,
            }
            say(f"  seeded {measure}: {fits[measure]}")
    finally:
        await producer.stop()
    return {"patients": patients, "fits": fits}


#: Worker log lines the phases time (regexes; the first occurrence counts).
MARKS = {
    "restoring": r"Restoring state from changelog topics",
    "done_reading": r"Done reading from changelog topics",
    "recovery_complete": r"Recovery complete",
    "ready": r"\[\^Worker\]: Ready",
}
FIT = re.compile(r"population (\S+) v(\d+): (\d+) patients, effect \S+, (\d+) steps in ([\d.]+) s")
REVOKING = re.compile(r"Revoking previously assigned partitions")
RESCORED = re.compile(r"posterior (\S+) v(\d+): rescored, (\d+) scores republished")


def proc_status(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM (MB) of a process, and its CPU seconds (user + system)."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    out[line.split(":")[0]] = int(line.split()[1]) / 1024.0
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
        out["cpu_s"] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        pass
    return out


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def worker_process(env: dict[str, str]):
    from cli.worker_process import WorkerProcess

    return WorkerProcess(env)


LOG_TIME = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\]", re.MULTILINE)


def log_seconds(log_text: str, pattern: str | re.Pattern) -> list[tuple[float, re.Match]]:
    """(timestamp as epoch seconds, match) of every log line matching ``pattern``,
    from the worker's own log timestamps (finer than this script's polling)."""
    out = []
    for line in log_text.splitlines():
        found = re.search(pattern, line)
        stamp = LOG_TIME.match(line)
        if found and stamp:
            when = datetime.strptime(stamp.group(1), "%Y-%m-%d %H:%M:%S,%f")
            out.append((when.timestamp(), found))
    return out


def after_ready(log_text: str) -> dict:
    """From the log: seconds from ``Ready`` to each measure's first population
    posterior (its ``population <measure> v<n>`` line), and the largest drift
    faust logged for its timers (a blocked event loop)."""
    ready = log_seconds(log_text, MARKS["ready"])
    if not ready:
        return {}
    t_ready = ready[0][0]
    first: dict[str, float] = {}
    for when, found in log_seconds(log_text, FIT):
        first.setdefault(found.group(1), when - t_ready)
    return {
        "first_posterior_after_ready_s": first,
        "first_posterior_any_measure_after_ready_s": min(first.values()) if first else None,
        "faust_timer_drift_max_s": timer_drift_max(log_text),
    }


def run_worker_phase(
    name: str,
    env: dict[str, str],
    data_dir: Path,
    *,
    wait_fits: bool,
    args,
    update=None,
    update_before_start=None,
) -> dict:
    """Start a worker on ``data_dir``, time its recovery from its log, sample its
    memory, wait for every measure's population update (``wait_fits``), then call
    ``update`` (new evidence) and wait for every measure's next, warm update, wait
    ``--observe`` seconds more, then stop it cleanly (SIGTERM) and measure the
    data dir. ``update_before_start``: new evidence sent while no worker runs (it
    waits in the topic), so the restarted worker's first population update has
    something to fit (a restart on the same evidence publishes no posterior).
    Scrapes the worker's metrics (the event-loop lag) before stopping it. A
    worker that exits by itself is reported (``crashed``)."""
    pending_update = update_before_start() if update_before_start is not None else None
    worker = worker_process({**env, "EFFICACY_DATA_DIR": str(data_dir)})
    say(f"{name}: starting a worker on {data_dir} (log {worker.log_path})")
    started = time.monotonic()
    worker.start()
    pid = worker.process.pid
    marks: dict[str, dict] = {}
    fits: dict[str, dict] = {}
    rescored: dict[str, dict] = {}
    samples = []
    observe_until = None
    crashed = False
    updated = None
    first_versions: dict[str, int] = {}
    deadline = started + args.timeout
    last_say = started
    try:
        while True:
            now = time.monotonic()
            status = proc_status(pid)
            if status:
                samples.append({"t": round(now - started, 1), **status})
            text = worker.log_text()
            for mark, pattern in MARKS.items():
                if mark not in marks and re.search(pattern, text):
                    marks[mark] = {"seconds": now - started, **status}
                    say(
                        f"  {mark} after {now - started:.1f} s, RSS {status.get('VmRSS', 0):.0f} MB"
                    )
            for match in FIT.finditer(text):
                measure = match.group(1)
                key = f"{measure} v{match.group(2)}"
                if key not in fits:
                    fits[key] = {
                        "measure": measure,
                        "version": int(match.group(2)),
                        "patients": int(match.group(3)),
                        "steps": int(match.group(4)),
                        "fit_seconds_logged": float(match.group(5)),
                        "seen_at_seconds": now - started,
                        **status,
                    }
                    say(f"  population fit {key}: {fits[key]}")
            for match in RESCORED.finditer(text):
                key = f"{match.group(1)} v{match.group(2)}"
                if key not in rescored:
                    rescored[key] = {
                        "scores": int(match.group(3)),
                        "seen_at_seconds": now - started,
                    }
                    say(f"  rescored {key}: {rescored[key]}")
            if not worker.alive():
                crashed = True
                say(f"{name}: the worker exited by itself:\n{worker.log_tail(15)}")
                break
            fitted_measures = {f["measure"] for f in fits.values()}
            fitted = not wait_fits or fitted_measures == set(MEASURES)
            if fitted and wait_fits and update is not None:
                if updated is None:
                    say(f"  {name}: new evidence for the warm update")
                    updated = {"sent_at_seconds": time.monotonic() - started, **update()}
                    first_versions = {f["measure"]: f["version"] for f in fits.values()}
                later = {
                    f["measure"]
                    for f in fits.values()
                    if f["version"] > first_versions[f["measure"]]
                }
                fitted = later == set(MEASURES)
            if "ready" in marks and observe_until is None and fitted:
                observe_until = now + args.observe
            if observe_until is not None and now >= observe_until:
                break
            if now > deadline:
                say(f"{name}: timeout after {args.timeout:.0f} s; stopping")
                break
            if now - last_say > 30:
                last_say = now
                say(f"  {name}: {now - started:.0f} s, {status}")
            time.sleep(0.5)
        metrics = {} if crashed else scrape_metrics(worker.log_text())
        final = {} if crashed else proc_status(pid)
        say(f"{name}: stopping (SIGTERM); {final}")
        stop_started = time.monotonic()
        code = worker.stop(timeout=300)
        stop_seconds = time.monotonic() - stop_started
    finally:
        if worker.alive():
            worker.kill()
    log_text = worker.log_text()
    errors = [line for line in log_text.splitlines() if "[ERROR]" in line or "Traceback" in line]
    peak = max(samples, key=lambda s: s.get("VmRSS", 0)) if samples else {}
    result = {
        "name": name,
        "marks": marks,
        "recovery_seconds": marks.get("recovery_complete", {}).get("seconds"),
        "ready_seconds": marks.get("ready", {}).get("seconds"),
        "crashed": crashed,
        "log_tail_if_crashed": worker.log_tail(60) if crashed else None,
        "population_fits": fits,
        "evidence_update": updated,
        "evidence_update_before_start": pending_update,
        **after_ready(log_text),
        "event_loop_lag": loop_lag(metrics),
        "rescored": rescored,
        "rss_mb_at_ready": marks.get("ready", {}).get("VmRSS"),
        "rss_mb_end": final.get("VmRSS"),
        "hwm_mb_end": final.get("VmHWM") or (samples[-1].get("VmHWM") if samples else None),
        "rss_mb_peak_sampled": peak.get("VmRSS"),
        "cpu_seconds_end": final.get("cpu_s"),
        "stop_seconds": stop_seconds,
        "exit_code": code,
        "data_dir_bytes": folder_bytes(data_dir),
        "metrics": {
            k: v
            for k, v in metrics.items()
            if k.startswith(
                (
                    "efficacy_scores_published_total",
                    "efficacy_population_update_seconds_sum",
                    "efficacy_population_update_seconds_count",
                    "efficacy_population_patients",
                    "efficacy_population_posterior_version",
                    "efficacy_patients_tracked",
                    "efficacy_event_loop_lag_seconds",
                )
            )
        },
        "log_errors": errors[:20],
        "log_path": str(worker.log_path),
        "rss_samples": samples[:: max(1, len(samples) // 200)],
    }
    say(
        f"{name}: recovery {result['recovery_seconds']} s, ready {result['ready_seconds']} s, "
        f"first posteriors after ready {result.get('first_posterior_after_ready_s')}, "
        f"loop lag {result['event_loop_lag']}, timer drift {result.get('faust_timer_drift_max_s')}, "
        f"RSS {result['rss_mb_end']} MB (HWM {result['hwm_mb_end']}), "
        f"data dir {result['data_dir_bytes'] / 1e9:.2f} GB, stop {stop_seconds:.1f} s, exit {code}"
    )
    return result


def standby_takeover(
    env: dict[str, str], data_dir: Path, spare_dir: Path, args, update, patients_topic: str
) -> dict:
    """A worker with standby copies takes over a killed one's partitions.

    Two workers with ``EFFICACY_STANDBY_REPLICAS=1``: A on ``data_dir`` (the
    earlier phases left it complete), B on the empty ``spare_dir``. B joins, is
    assigned half of the partitions and keeps standby copies of A's; once B's
    CPU has been idle for 10 s (its standby copies are read), A is SIGKILLed and
    new evidence is sent. B's takeover, from its log: seconds from the kill to
    faust's ``Worker ready`` of the rebalance that gives it A's partitions, the
    patients-changelog records that recovery read against those the partitions
    hold (a full replay reads all of them), the first population posterior
    after it, and B's event-loop lag over the takeover."""
    from cli.worker_process import READY

    env = {**env, "EFFICACY_STANDBY_REPLICAS": "1"}
    first = worker_process({**env, "EFFICACY_DATA_DIR": str(data_dir)})
    second = worker_process({**env, "EFFICACY_DATA_DIR": str(spare_dir)})
    result: dict = {"name": "standby takeover"}
    try:
        say(f"standby: worker A on {data_dir} (log {first.log_path})")
        first.start()
        first.wait_for_log(READY, timeout=args.timeout)
        say(f"standby: worker B on {spare_dir} (log {second.log_path})")
        second.start()
        second.wait_for_log(READY, timeout=args.timeout)
        settled_at = wait_idle(second.process.pid, idle_seconds=10.0, timeout=args.timeout)
        result["b_idle_after_start_s"] = settled_at
        before = scrape_metrics(second.log_text())
        lines_before = len(second.log_text().splitlines())
        say(f"standby: B idle after {settled_at:.0f} s; SIGKILL to A")
        killed_at = time.time()
        first.kill()
        result["evidence_update"] = update()
        deadline = time.monotonic() + args.timeout
        ready_at = None
        while time.monotonic() < deadline and second.alive():
            new_lines = "\n".join(second.log_text().splitlines()[lines_before:])
            marks = [when for when, _ in log_seconds(new_lines, r"\[\^---Recovery\]: Worker ready")]
            fits = [when for when, _ in log_seconds(new_lines, FIT) if when > killed_at]
            if marks and ready_at is None:
                ready_at = marks[-1]
                say(f"  B ready after the takeover: {ready_at - killed_at:.1f} s after the kill")
            if ready_at is not None and fits:
                break
            time.sleep(0.5)
        time.sleep(args.observe)
        new_lines = "\n".join(second.log_text().splitlines()[lines_before:])
        fits = [when for when, _ in log_seconds(new_lines, FIT) if when > killed_at]
        revoked = [when for when, _ in log_seconds(new_lines, REVOKING) if when > killed_at]
        replayed, held = second.takeover_replay(patients_topic)
        result.update(
            {
                # the group notices the kill after the session timeout
                "rebalance_after_kill_s": revoked[0] - killed_at if revoked else None,
                "ready_after_rebalance_s": (
                    ready_at - revoked[0] if revoked and ready_at is not None else None
                ),
                "ready_after_kill_s": None if ready_at is None else ready_at - killed_at,
                "first_posterior_after_kill_s": fits[0] - killed_at if fits else None,
                "first_posterior_after_ready_s": (
                    fits[0] - ready_at if fits and ready_at is not None else None
                ),
                "patients_changelog_records_replayed": replayed,
                "patients_changelog_records_held": held,
                "event_loop_lag": loop_lag(scrape_metrics(second.log_text()), since=before),
                "faust_timer_drift_max_s": timer_drift_max(new_lines),
                "b_rss_mb": proc_status(second.process.pid).get("VmRSS"),
                "log_path": str(second.log_path),
            }
        )
        say(f"standby: {result}")
    finally:
        for worker in (first, second):
            if worker.alive():
                worker.stop(timeout=300)
    return result


def wait_idle(pid: int, idle_seconds: float, timeout: float) -> float:
    """Seconds until process ``pid`` has used under 5% of a core for
    ``idle_seconds`` in a row."""
    started = time.monotonic()
    window: list[tuple[float, float]] = []
    while time.monotonic() - started < timeout:
        now, cpu = time.monotonic(), proc_status(pid).get("cpu_s", 0.0)
        window = [(t, c) for t, c in window if now - t <= idle_seconds] + [(now, cpu)]
        span = now - window[0][0]
        if span >= idle_seconds * 0.9 and (cpu - window[0][1]) / span < 0.05:
            return now - started
        time.sleep(1.0)
    raise TimeoutError(f"process {pid} not idle within {timeout:.0f} s")


OFFSET_KEY = b"__faust\x00offset__"  # faust's persisted changelog offset, in every partition db


def check_store(data_dir: Path, patients: int, written: dict[int, str]) -> dict:
    """Open the stopped worker's RocksDB partitions read-only: count the keys of both
    tables and compare a sample of patients' statistics with what was written."""
    from faust.stores.rocksdb import RocksDBOptions

    options = RocksDBOptions(use_rocksdict=True)
    counts = {}
    found = {}
    wanted = {dumps(f"patient-{i:07d}").encode(): i for i in written}
    for table in ("patients", "population-evidence"):
        total = 0
        for path in sorted(data_dir.rglob(f"{table}-*.db")):
            if not path.name[len(table) + 1 : -3].isdigit():
                continue
            db = options.open(path, read_only=True)
            try:
                total += sum(1 for key in db.keys() if key != OFFSET_KEY)  # noqa: SIM118
                if table == "patients":
                    for key in wanted:
                        value = db.get(key)
                        if value is not None:
                            found[wanted[key]] = value
            finally:
                db.close()
        counts[table] = total
    mismatched = 0
    for i, value in found.items():
        record = json.loads(value)
        if record["measures"] != json.loads(written[i])["measures"]:
            mismatched += 1
    return {
        "patients_keys": counts["patients"],
        "evidence_keys": counts["population-evidence"],
        "patients_expected": patients,
        "evidence_expected": patients * len(MEASURES),
        "probe": len(written),
        "probe_found": len(found),
        "probe_statistics_differ": mismatched,
    }


def probe_patients_agent(bootstrap: str, store: str = "rocksdb://") -> dict:
    """Push a small simulated programme (40 patients × 3 measures × 5 readings)
    through the raw topics to a worker with ``store`` and no population fit, and
    report what the patients table holds afterwards against the raw topics'
    committed offsets. Before streams/stores.py, with rocksdb:// the patients
    agent's ``save`` (inside a ``take_events`` batch, where faust sets no current
    event) failed faust's ``assert event is not None`` in ``Store._set``, the batch
    was acked anyway and the table stayed empty."""
    import uuid

    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
    from aiokafka.admin import AIOKafkaAdminClient

    from cli.programme import build_programme
    from cli.worker_process import READY, WorkerProcess
    from streams.settings import Settings
    from streams.topics import ensure_topics

    run = uuid.uuid4().hex[:6]
    prefix, app_id = f"probe-{run}.", f"probe-{run}"
    data = Path(tempfile.mkdtemp(prefix="state-scale-probe-"))
    env = {
        "EFFICACY_BOOTSTRAP_SERVERS": bootstrap,
        "EFFICACY_TOPIC_PREFIX": prefix,
        "EFFICACY_APP_ID": app_id,
        "EFFICACY_PARTITIONS": "4",
        "EFFICACY_STORE_URL": store,
        "EFFICACY_WEB_ENABLED": "false",
        "EFFICACY_METRICS_PORT": "0",
        "EFFICACY_DATA_DIR": str(data),
        "EFFICACY_POPULATION_MIN_PATIENTS": "100000",  # no posterior, no rescoring
        "EFFICACY_SELECTION_INTERVAL_SECONDS": "0",
    }
    patients = 40
    programme = build_programme(
        MEASURES, num_patients=patients, num_cohorts=4, obs_per_patient=5, seed=3
    )
    records = programme.send_order()
    settings = Settings(bootstrap_servers=bootstrap, topic_prefix=prefix, partitions=4)
    asyncio.run(ensure_topics(settings))

    async def send() -> None:
        producer = AIOKafkaProducer(**aiokafka_options(bootstrap), acks="all")
        await producer.start()
        try:
            for record in records:
                await producer.send_and_wait(prefix + record.topic, record.value, key=record.key)
        finally:
            await producer.stop()

    async def offsets() -> dict:
        admin = AIOKafkaAdminClient(**aiokafka_options(bootstrap))
        await admin.start()
        try:
            committed = await admin.list_consumer_group_offsets(app_id)
        finally:
            await admin.close()
        consumer = AIOKafkaConsumer(**aiokafka_options(bootstrap))
        await consumer.start()
        try:
            tps = [
                TopicPartition(f"{prefix}{topic}", p)
                for topic in ("enrollments", "wearables", "labs", "pros")
                for p in range(4)
            ]
            end = await consumer.end_offsets(tps)
            written = {}  # messages the patients agent wrote, per topic
            for name, topic in (
                ("patients_changelog_messages", f"{app_id}-patients-changelog"),
                ("population_evidence_messages", f"{prefix}population-evidence"),
                ("scores_messages", f"{prefix}scores"),
            ):
                parts = [TopicPartition(topic, p) for p in range(4)]
                written[name] = sum((await consumer.end_offsets(parts)).values())
        finally:
            await consumer.stop()
        return {
            **written,
            "raw_end": sum(end.values()),
            "raw_committed": sum(committed[tp].offset for tp in tps if committed.get(tp)),
        }

    say(f"probe: {len(records)} records through a worker with {store}")
    with WorkerProcess(env) as worker:
        worker.wait_for_log(READY, timeout=300)
        asyncio.run(send())
        time.sleep(60)
        alive = worker.alive()
        text = worker.log_text()
    out = {
        "store": store,
        "records_sent": len(records),
        "patients_sent": patients,
        "worker_alive_after_60_s": alive,
        "agent_crashes_logged": text.count("Crashed reason=AssertionError"),
        "assertion": "faust/stores/rocksdb.py Store._set: assert event is not None"
        if "assert event is not None" in text
        else None,
        **asyncio.run(offsets()),
        "rocksdb_store_after_stop": check_store(data, patients, {})
        if store.startswith("rocksdb")
        else None,
    }
    shutil.rmtree(data, ignore_errors=True)
    say(f"  probe: {out}")
    return out


def kafka_topic_bytes(kafka, topics: list[str]) -> dict[str, int]:
    """Bytes on the local broker's disk per topic (all partitions); {} for a
    configured broker."""
    if kafka is None or kafka.run_dir is None:
        return {}
    data = kafka.run_dir / "data"
    return {
        topic: sum(
            folder_bytes(p) for p in data.glob(f"{topic}-*") if p.name.rsplit("-", 1)[1].isdigit()
        )
        for topic in topics
    }


def with_broker(function):
    """``function(bootstrap)`` on KAFKA_BOOTSTRAP_SERVERS, or on a local broker."""
    bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if bootstrap:
        return function(bootstrap)
    from cli.broker import LocalKafka

    kafka = LocalKafka(log=say)
    try:
        return function(kafka.start())
    finally:
        kafka.stop()


def end_to_end(args) -> dict:
    """Changelogs of ``args.patients`` patients × 3 measures, then a worker: first
    start on an empty data dir, restart on the same data dir, restart on a deleted
    one; with ``--standby`` then a standby takeover (``standby_takeover``), with
    ``--only-standby`` the first start and the takeover only."""
    import uuid

    from streams.settings import Settings
    from streams.topics import ensure_topics

    where = machine()
    bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    kafka = None
    if not bootstrap:
        from cli.broker import LocalKafka

        kafka = LocalKafka(log=say)
        bootstrap = kafka.start()
    run_id = uuid.uuid4().hex[:8]
    app_id = f"ss-{run_id}"
    prefix = f"ss-{run_id}."
    root = Path(args.data_root or tempfile.mkdtemp(prefix="state-scale-e2e-"))
    root.mkdir(parents=True, exist_ok=True)
    data_dir = root / "data"
    env = {
        "EFFICACY_BOOTSTRAP_SERVERS": bootstrap,
        "EFFICACY_TOPIC_PREFIX": prefix,
        "EFFICACY_APP_ID": app_id,
        "EFFICACY_PARTITIONS": str(args.partitions),
        "EFFICACY_STORE_URL": "rocksdb://",
        "EFFICACY_WEB_ENABLED": "false",
        "EFFICACY_METRICS_PORT": "0",
        "EFFICACY_POPULATION_INTERVAL_SECONDS": str(args.population_interval),
        "EFFICACY_SELECTION_INTERVAL_SECONDS": "0",
    }
    result: dict = {
        "parameters": {
            "patients": args.patients,
            "measures": MEASURES,
            "readings_per_measure": args.readings_per_measure,
            "templates": args.templates,
            "cohorts": args.cohorts,
            "partitions": args.partitions,
            "population_interval_seconds": args.population_interval,
            "observe_seconds": args.observe,
            "seed_posteriors": args.seed_posteriors,
            "skip_first_update": args.skip_first_update,
            "store": "rocksdb://",
            "broker": "configured" if kafka is None else "local",
            "producer": "aiokafka, acks=1, linger 50 ms, 1 MB batches, no compression",
        },
        "machine": where,
    }
    try:
        settings = Settings(
            bootstrap_servers=bootstrap, topic_prefix=prefix, partitions=args.partitions
        )
        asyncio.run(ensure_topics(settings))
        say(
            f"templates: {args.templates} patients × 3 measures × {args.readings_per_measure} readings (apply_event)"
        )
        templates = make_templates(args.templates, args.readings_per_measure)
        cloner = Cloner(templates, args.cohorts, args.partitions, seed=11)
        probe = set(random.Random(3).sample(range(args.patients), min(200, args.patients)))
        written: dict[int, str] = {}
        say(f"writing {args.patients:,} patients into the changelogs of app {app_id}")
        produced = asyncio.run(
            produce_state(bootstrap, app_id, args.partitions, cloner, args.patients, probe, written)
        )
        say(
            f"  {produced['seconds']:.0f} s, {produced['record_bytes_mean']:,.0f} bytes per record, "
            f"{produced['evidence_bytes_mean']:,.0f} per evidence"
        )
        result["produced"] = produced
        if args.seed_posteriors:
            say(f"seeding the posteriors: fits on {args.seed_posteriors:,} other clones")
            result["seeded_posteriors"] = asyncio.run(
                seed_posteriors(bootstrap, prefix, templates, args.seed_posteriors, args.cohorts)
            )
        topics = [produced["patients_topic"], produced["evidence_topic"]]
        result["broker_bytes_after_produce"] = kafka_topic_bytes(kafka, topics)
        phases = {}
        changed = random.Random(5).sample(
            range(args.patients), max(1, int(args.update_fraction * args.patients))
        )

        def update() -> dict:
            return asyncio.run(
                send_evidence_updates(bootstrap, prefix, args.partitions, cloner, changed)
            )

        phases["first_start"] = run_worker_phase(
            "first start (empty data dir)",
            env,
            data_dir,
            wait_fits=True,
            args=args,
            update=None if args.skip_first_update else update,
        )
        phases["first_start"]["store"] = check_store(data_dir, args.patients, written)
        say(f"  store: {phases['first_start']['store']}")
        result["phases"] = phases
        write_json(args.out, result)
        if args.only_standby:
            phases["standby_takeover"] = standby_takeover(
                env, data_dir, root / "standby", args, update, produced["patients_topic"]
            )
            return result
        phases["same_host_restart"] = run_worker_phase(
            "restart on the same data dir",
            env,
            data_dir,
            wait_fits=True,
            args=args,
            update_before_start=update,
        )
        phases["same_host_restart"]["store"] = check_store(data_dir, args.patients, written)
        say(f"  store: {phases['same_host_restart']['store']}")
        write_json(args.out, result)
        if not args.skip_fresh_host:
            shutil.rmtree(data_dir)
            phases["fresh_host_restart"] = run_worker_phase(
                "restart on a deleted data dir",
                env,
                data_dir,
                wait_fits=True,
                args=args,
                update_before_start=update,
            )
            phases["fresh_host_restart"]["store"] = check_store(data_dir, args.patients, written)
            say(f"  store: {phases['fresh_host_restart']['store']}")
            write_json(args.out, result)
        if args.standby:
            phases["standby_takeover"] = standby_takeover(
                env, data_dir, root / "standby", args, update, produced["patients_topic"]
            )
        result["broker_bytes_end"] = kafka_topic_bytes(kafka, topics)
    finally:
        if kafka is not None:
            kafka.stop()
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=200_000, help="records written to RocksDB")
    parser.add_argument("--readings", default="10,30,100,300", help="readings per measure")
    parser.add_argument("--target-patients", type=int, default=1_000_000)
    parser.add_argument(
        "--sizes-only",
        action="store_true",
        help="only the record sizes (results/record_sizes.json)",
    )
    end = parser.add_argument_group("end to end (--end-to-end)")
    end.add_argument("--end-to-end", action="store_true", help="changelogs + a real worker")
    end.add_argument("--patients", type=int, default=20_000)
    end.add_argument("--readings-per-measure", type=int, default=30)
    end.add_argument("--templates", type=int, default=64, help="patients built by apply_event")
    end.add_argument("--cohorts", type=int, default=20)
    end.add_argument("--partitions", type=int, default=4)
    end.add_argument("--population-interval", type=float, default=5.0, help="seconds")
    end.add_argument("--observe", type=float, default=60.0, help="seconds after ready (and fits)")
    end.add_argument("--timeout", type=float, default=3600.0, help="seconds per worker phase")
    end.add_argument("--skip-fresh-host", action="store_true")
    end.add_argument(
        "--skip-first-update",
        action="store_true",
        help="the first start stops after its first posteriors, without new evidence and "
        "the warm update after it (at 1M patients the new owner's recent-window fits, "
        "each cold, hold that update for tens of minutes)",
    )
    end.add_argument(
        "--standby",
        action="store_true",
        help="then two workers with standby replicas; one is killed, the other's takeover timed",
    )
    end.add_argument(
        "--only-standby",
        action="store_true",
        help="skip the restarts: a first start fills the data dir, then the standby phase",
    )
    end.add_argument(
        "--seed-posteriors",
        type=int,
        default=0,
        metavar="N",
        help="publish each measure's posterior fitted on N other clones before the first "
        "start: it continues from them (warm) instead of cold fits of every patient",
    )
    end.add_argument("--data-root", help="folder for the worker's data dir (default: a temp dir)")
    end.add_argument("--keep", action="store_true", help="keep the data dir")
    end.add_argument("--out", default="state_scale_e2e", help="results/<out>.json")
    end.add_argument(
        "--update-fraction",
        type=float,
        default=0.01,
        help="after the first fits, this fraction of patients sends new evidence (warm update)",
    )
    end.add_argument(
        "--probe-only",
        action="store_true",
        help="only the probe of the patients agent with rocksdb:// (and memory://), "
        "merged into results/<out>.json",
    )
    args = parser.parse_args(argv)
    if args.probe_only:
        path = RESULTS / f"{args.out}.json"
        result = json.loads(path.read_text()) if path.exists() else {}
        result["patients_agent_probe"] = with_broker(
            lambda bootstrap: [
                probe_patients_agent(bootstrap, s) for s in ("rocksdb://", "memory://")
            ]
        )
        write_json(args.out, result)
        say(f"wrote {path}")
        return 0
    if args.end_to_end:
        result = end_to_end(args)
        path = write_json(args.out, result)
        say(f"wrote {path}")
        return 0
    where = machine()
    readings = [int(x) for x in args.readings.split(",")]
    say("record sizes (apply_event on a 3-measure programme)")
    sizes = record_sizes(readings)
    if args.sizes_only:
        path = write_json("record_sizes", {"record_sizes": sizes, "machine": where})
        say(f"wrote {path}")
        return 0
    typical = sizes[str(readings[1] if len(readings) > 1 else readings[0])]
    say(f"rocksdict: {args.records:,} records of {typical['record_bytes_median']:,} bytes")
    rocks = rocksdb_rates(args.records, typical["record_bytes_median"])
    say(
        f"  {rocks['write_records_per_s']:,.0f} writes/s, {rocks['random_reads_per_s']:,.0f} reads/s"
    )
    parses = parse_rates(sizes[str(readings[0])]["sample"] or "")
    say(f"  parse: {parses}")
    cost = json.loads((RESULTS / "population_cost.json").read_text())
    one_million = next(s for s in cost["sizes"] if s["patients"] == 1_000_000)
    n = args.target_patients
    extrapolated = {
        "patients": n,
        "readings_per_measure": typical["readings_per_measure"],
        "table_bytes": n * typical["record_bytes_median"],
        "rocksdb_disk_bytes": n * rocks["disk_bytes_per_record"],
        "recovery_rocksdb_write_seconds": n / rocks["write_records_per_s"],
        "recovery_population_rebuild_parse_seconds": 3 * n / parses["patient_evidence_parse_per_s"],
        "rescore_all_record_parse_seconds": n / parses["patient_record_parse_per_s"],
        # the streaming population agent runs 100-step warm updates (STREAMING_SVI):
        # twice the measured 50-step update, for each of the 3 measures
        "population_update_seconds_per_measure": 2 * one_million["warm_seconds_median"],
        "population_update_seconds_3_measures": 6 * one_million["warm_seconds_median"],
        "population_init_seconds_per_measure": one_million["init_seconds"],
    }
    result = {
        "record_sizes": sizes,
        "rocksdb": rocks,
        "parse": parses,
        "population_cost_file": "results/population_cost.json",
        "population_cost_1m": one_million,
        "extrapolated_1m": extrapolated,
        "machine": where,
        "parameters": vars(args),
    }
    path = write_json("state_scale", result)
    say(f"wrote {path}")
    print(json.dumps(extrapolated, indent=1))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.exit(main())
