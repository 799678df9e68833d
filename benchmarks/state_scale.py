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
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import RESULTS, machine, say, write_json

MEASURES = ["resting_heart_rate", "hba1c", "phq9"]


def rss_mb() -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def record_sizes(readings_per_measure: list[int], patients: int = 20) -> dict:
    """JSON size of PatientRecords built by apply_event (median over patients)."""
    from streams.app import measure_models
    from streams.catalogue import Catalogue
    from streams.patient_state import PatientRecord, apply_event
    from streams.programme import build_programme
    from streams.schemas import Origin
    from streams.settings import Settings
    from streams.validation import validate_enrollment, validate_observation

    catalogue = Catalogue.load()
    settings = Settings(max_age_days=36500.0)
    models = measure_models(catalogue, settings)
    out = {}
    for n in readings_per_measure:
        programme = build_programme(
            MEASURES, num_patients=patients, num_cohorts=5, obs_per_patient=n, seed=5,
            time_span=max(90.0, n / 2.0),
        )  # fmt: skip
        records: dict[str, PatientRecord] = {}
        for offset, raw in enumerate(programme.send_order()):
            origin = Origin(topic=f"efficacy.{raw.topic}", partition=offset % 4, offset=offset)
            if raw.topic == "enrollments":
                event = validate_enrollment(raw.key, raw.value, origin, settings)
            else:
                event = validate_observation(
                    raw.topic, raw.key, raw.value, origin, catalogue, settings
                )
            record, _ = apply_event(records.get(event.patient_id), event, models)
            records[event.patient_id] = record
        sizes = [len(r.model_dump_json()) for r in records.values()]
        one = statistics.median_low(sizes)
        sample = next(r for r in records.values() if len(r.model_dump_json()) == one)
        parts = {
            "seen": len(json.dumps(sample.seen)),
            "recent": sum(len(json.dumps(m.recent)) for m in sample.measures.values()),
            "measures_without_recent": sum(
                len(m.model_dump_json(exclude={"recent"})) for m in sample.measures.values()
            ),
        }
        out[str(n)] = {
            "readings_per_measure": n,
            "events_per_patient": len(sample.seen),
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
        gram=stats.gram,
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=200_000, help="records written to RocksDB")
    parser.add_argument("--readings", default="10,30,100,300", help="readings per measure")
    parser.add_argument("--target-patients", type=int, default=1_000_000)
    args = parser.parse_args(argv)
    where = machine()
    readings = [int(x) for x in args.readings.split(",")]
    say("record sizes (apply_event on a 3-measure programme)")
    sizes = record_sizes(readings)
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
