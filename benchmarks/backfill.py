"""Backfill and scale-out of the worker on a real Kafka broker (issue 14).

    python -m benchmarks.backfill            # 1M readings -> results/backfill.json
    python -m benchmarks.backfill --quick    # 100k readings -> results/backfill_quick.json

One programme (``--readings`` readings: ``--readings / --obs-per-patient``
patients, enrolments and exposure changes first, then readings in event-time
order; one measure) is run three times in one invocation, on one broker, each
run on its own topic set (prefix) and consumer group, every worker on an empty
data dir with ``rocksdb://`` (the production store), the worker's own settings
otherwise (the population agent fits every ``--population-interval`` s):

1. **live**: a worker is started and ready first; then the records are produced
   at ``--live-rate`` readings/s (0: as fast as the producer goes), so the
   worker's batches and population fits interleave with the arrivals.
2. **backfill**: every record is written to the raw topics first (timed apart),
   then a worker is started on an empty data dir and replays them from offset 0.
   Wall time from the worker's spawn (and from its ``Ready``) to the last
   reading processed; readings/s.
3. **burst1** / **burst2**: one worker, then two workers (one consumer group,
   own data dirs), started and ready on their own copy of the topics first; then
   every record is produced as fast as the producer goes (a backlog the workers
   share). The scale-out comparison: with records already waiting (a backfill),
   the first worker to be ready takes every partition and the second joins only
   after a rebalance that waits for the first worker's batch, which at 100k
   readings came after nearly all of them were processed; so two workers are
   compared on a burst, not a replay. ``backfill2`` (``--runs``) is that
   two-worker replay.

Progress is read off the worker's own output (benchmarks.throughput's
``Collector``: every batch forwards the touched patients' statistics with the
count of readings applied). After every reading is processed, each run waits
until the worker is quiet and its last population posterior covers every
patient, and reads back what it published:

* **statistics**: the last ``PatientEvidence`` per patient (Gram matrix,
  reference time, counts, cohort): compared **exactly** (bytes of the JSON
  values) between runs;
* **population posterior**: the last ``PopulationPosterior``: equal when it was
  fitted on the same evidence, i.e. the same ``evidence_digest`` (the SHA-256 of
  the book the population agent fitted, streams.agents.population). The fitted
  numbers themselves are not compared for equality: SVI is warm-started from each
  run's previous fit, and the runs fit at different moments, so they differ by
  the optimiser's noise (reported: the effect's mean in posterior sds);
* **scores**: the last published score per patient. A score is republished only
  when it moved materially (streams.scoring.changed_materially: the call, the
  effect by 0.1 sd, its sd by 5%, P(benefit ≥ MCID) by 0.02) or when the
  population posterior moved; so the last published score of each run is within
  those bounds of the score of the run's final state, and two runs' last scores
  are *equal within tolerance* when the call is the same, the effect means are
  within 0.2 sd, the sds within 10% and P(benefit ≥ MCID) within 0.04 (twice the
  thresholds). Differences of the posteriors (above) add to this: reported.

Records per worker CPU-second compare burst2 with burst1 (the same records):
the workers' CPU from the first record produced to the last reading processed
(for a backfill, from each worker's ``Ready``: without start-up, imports,
recovery and JIT, which a long backfill amortises; with it, reported too).

Uses the broker named by ``KAFKA_BOOTSTRAP_SERVERS`` or starts a local one.
Broker, workers and this process share the machine's cores.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import re
import shutil
import sys
import tempfile
import time
import uuid

import numpy as np

from benchmarks.common import (
    cpu_seconds,
    loop_lag,
    machine,
    say,
    scrape_metrics,
    timer_drift_max,
    write_json,
)
from benchmarks.throughput import (
    MEASURE,
    Collector,
    create_topics,
    expected_counts,
    producer,
    programme_records,
    send_all,
)
from cli.worker_process import READY, WorkerProcess
from streams.kafka_options import aiokafka_options
from streams.settings import Settings


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--readings", type=int, default=1_000_000)
    add("--obs-per-patient", type=int, default=10)
    add("--partitions", type=int, default=4)
    add("--live-rate", type=float, default=2000.0, help="readings/s of the live run (0: unpaced)")
    add("--population-interval", type=float, default=5.0, help="seconds (the worker's setting)")
    add("--store", default="rocksdb://")
    add("--runs", default="live,backfill,burst1,burst2", help="which runs, comma-separated")
    add("--timeout", type=float, default=7200.0, help="longest wait for one run (s)")
    add(
        "--settle-timeout",
        type=float,
        default=300.0,
        help="longest wait after the last reading for the workers to go quiet (s)",
    )
    add("--quick", action="store_true", help="100k readings")
    add("--out", default=None, help="results/<out>.json (default backfill[_quick])")
    args = parser.parse_args(argv)
    if args.quick:
        args.readings = 100_000
    args.out = args.out or ("backfill_quick" if args.quick else "backfill")
    return args


# ------------------------------------------------------------------ workers


def worker_env(bootstrap: str, prefix: str, app_id: str, args) -> dict[str, str]:
    return {
        "EFFICACY_BOOTSTRAP_SERVERS": bootstrap,
        "EFFICACY_TOPIC_PREFIX": prefix,
        "EFFICACY_APP_ID": app_id,
        "EFFICACY_PARTITIONS": str(args.partitions),
        "EFFICACY_STORE_URL": args.store,
        "EFFICACY_WEB_ENABLED": "false",
        "EFFICACY_METRICS_PORT": "0",
        "EFFICACY_POPULATION_INTERVAL_SECONDS": str(args.population_interval),
        "EFFICACY_SELECTION_INTERVAL_SECONDS": "0",
        "EFFICACY_DATA_DIR": tempfile.mkdtemp(prefix="backfill-worker-"),
    }


async def wait_ready(workers: list[WorkerProcess], started: float, timeout: float) -> list[dict]:
    """Wait until every worker logged ``Ready``; per worker: seconds after
    ``started`` and its CPU seconds then."""
    marks: list[dict | None] = [None] * len(workers)
    deadline = time.monotonic() + timeout
    while not all(marks):
        for i, worker in enumerate(workers):
            if marks[i] is None and re.search(READY, worker.log_text()):
                marks[i] = {
                    "seconds": time.monotonic() - started,
                    "cpu_s": cpu_seconds(worker.process.pid),
                }
            if not worker.alive():
                raise RuntimeError(f"worker exited:\n{worker.log_tail()}")
        if time.monotonic() > deadline:
            raise TimeoutError("workers not ready")
        await asyncio.sleep(0.2)
    return marks  # type: ignore[return-value]


async def send_paced(prod, prefix: str, records, rate: float) -> None:
    """Enrolments (acknowledged) first, then the rest at ``rate`` records/s."""
    enrol = [r for r in records if r.topic == "enrollments"]
    rest = [r for r in records if r.topic != "enrollments"]
    await send_all(prod, prefix, enrol)
    futures = []
    start = time.monotonic()
    for i, r in enumerate(rest):
        if i % 100 == 0:
            delay = start + i / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
        futures.append(await prod.send(prefix + r.topic, r.value, key=r.key))
    await prod.flush()
    for future in futures:
        await future


# ------------------------------------------------------------------ outputs


async def read_topic(broker: Settings, topic: str) -> list[tuple[bytes | None, dict]]:
    """Every record of ``topic`` from the beginning, in partition order, parsed."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(
        **aiokafka_options(broker),
        enable_auto_commit=False,
        fetch_max_bytes=64 * 1024 * 1024,
        max_partition_fetch_bytes=16 * 1024 * 1024,
        metadata_max_age_ms=1000,
    )
    await consumer.start()
    try:
        found = None
        while not found:  # the topic exists (the run created it): wait for its metadata
            await asyncio.sleep(0.2)
            found = consumer.partitions_for_topic(topic)
        parts = [TopicPartition(topic, p) for p in sorted(found)]
        consumer.assign(parts)
        await consumer.seek_to_beginning(*parts)
        end = await consumer.end_offsets(parts)
        out: dict = {tp: [] for tp in parts}

        async def behind() -> bool:
            return any([await consumer.position(tp) < end[tp] for tp in parts])

        while await behind():
            batch = await consumer.getmany(timeout_ms=500, max_records=50000)
            for tp, records in batch.items():
                out[tp] += [(r.key, json.loads(r.value)) for r in records]
        return [item for tp in parts for item in out[tp]]
    finally:
        await consumer.stop()


async def final_outputs(broker: Settings, prefix: str) -> dict:
    """What a run published, last value wins: statistics per patient, score per
    patient, posterior of the measure (and how many of each were published)."""
    evidence, scores, posterior = {}, {}, None
    batches = await read_topic(broker, prefix + "population-evidence")
    for _, batch in batches:
        for item in batch["items"]:
            evidence[item["patient_id"]] = item
    published = await read_topic(broker, prefix + "scores")
    for _, score in published:
        scores[score["patient_id"]] = score
    posteriors = [p for _, p in await read_topic(broker, prefix + "population-posterior")]
    posteriors = [p for p in posteriors if p.get("measure") == MEASURE]
    if posteriors:
        posterior = max(posteriors, key=lambda p: p["version"])
    return {
        "evidence": evidence,
        "scores": scores,
        "posterior": posterior,
        "evidence_messages": len(batches),
        "scores_published": len(published),
        "posteriors_published": len(posteriors),
    }


def statistics_key(item: dict) -> str:
    """A patient's statistics, as compared exactly between runs."""
    fields = ("cohort", "gram", "reference_time", "count_exposed", "count_unexposed")
    return json.dumps([item.get(f) for f in fields])


def admissible(score: dict, other: dict) -> bool:
    """Whether ``score``'s call is what the decision rule gives on ``other``'s
    probabilities and counts when the previous call was ``score``'s."""
    from model.config import DecisionRule
    from model.scores import classify

    # the counts are not in the score: the rule's data minimum is met whenever
    # either call is not insufficient_data
    enough = (
        10**6
        if "insufficient_data" not in (score["classification"], other["classification"])
        else 0
    )
    call = classify(
        np.array([other["p_benefit_ge_mcid"]]),
        np.array([other["p_benefit_gt_0"]]),
        np.array([enough]),
        np.array([enough]),
        DecisionRule(),
        previous=np.array([score["classification"]], dtype=object),
    )[0]
    return bool(call == score["classification"])


def compare(a: dict, b: dict) -> dict:
    """Run ``b``'s outputs against run ``a``'s (see the module docstring)."""
    patients = set(a["evidence"]) | set(b["evidence"])
    differ = [
        p
        for p in patients
        if p not in a["evidence"]
        or p not in b["evidence"]
        or statistics_key(a["evidence"][p]) != statistics_key(b["evidence"][p])
    ]
    pa, pb = a["posterior"], b["posterior"]
    posterior = None
    if pa is not None and pb is not None:
        ea, eb = pa["summary"]["effect"], pb["summary"]["effect"]
        posterior = {
            "same_evidence_digest": pa.get("evidence_digest") == pb.get("evidence_digest"),
            "num_patients": [pa["num_patients"], pb["num_patients"]],
            "versions": [pa["version"], pb["version"]],
            "effect_mean": [ea["mean"], eb["mean"]],
            "effect_mean_difference_in_sd": abs(ea["mean"] - eb["mean"]) / max(ea["sd"], 1e-12),
            "effect_sd_ratio": eb["sd"] / max(ea["sd"], 1e-12),
        }
    scored = set(a["scores"]) & set(b["scores"])
    mean_sd, sd_ratio, p_diff, same_call, band, within = [], [], [], 0, 0, 0
    calls: collections.Counter[str] = collections.Counter()
    for p in scored:
        sa = next(m for m in a["scores"][p]["measures"] if m["measure"] == MEASURE)
        sb = next(m for m in b["scores"][p]["measures"] if m["measure"] == MEASURE)
        sd = max(sa["effect"]["sd"], 1e-12)
        d_mean = abs(sa["effect"]["mean"] - sb["effect"]["mean"]) / sd
        d_sd = abs(sa["effect"]["sd"] - sb["effect"]["sd"]) / sd
        d_p = abs(sa["p_benefit_ge_mcid"] - sb["p_benefit_ge_mcid"])
        call = sa["classification"] == sb["classification"]
        # The call has hysteresis (model.config.DecisionRule): in the band between
        # a threshold to enter and one to leave, it depends on the patient's
        # earlier calls, i.e. on the run's path. A different call is within the
        # rule when each run's call is what the rule gives on the other run's
        # probabilities with that call as the previous one.
        hysteresis = not call and admissible(sa, sb) and admissible(sb, sa)
        if not call:
            calls[f"{sa['classification']} / {sb['classification']}"] += 1
        mean_sd.append(d_mean)
        sd_ratio.append(d_sd)
        p_diff.append(d_p)
        same_call += call
        band += hysteresis
        within += (call or hysteresis) and d_mean <= 0.2 and d_sd <= 0.10 and d_p <= 0.04

    def quantiles(values: list[float]) -> dict | None:
        if not values:
            return None
        x = np.array(values)
        return {q: float(np.quantile(x, float(q))) for q in ("0.5", "0.99", "1.0")}

    return {
        "patients": len(patients),
        "statistics_differ": len(differ),
        "statistics_differ_examples": sorted(differ)[:5],
        "statistics_equal": not differ,
        "posterior": posterior,
        "patients_scored_in_both": len(scored),
        "patients_scored_in_one_only": len(set(a["scores"]) ^ set(b["scores"])),
        "scores_same_call": same_call,
        "scores_other_call_in_hysteresis_band": band,
        "scores_other_call_pairs": dict(calls),
        "scores_within_tolerance": within,
        "scores_effect_mean_difference_in_sd": quantiles(mean_sd),
        "scores_effect_sd_difference_in_sd": quantiles(sd_ratio),
        "scores_p_benefit_ge_mcid_difference": quantiles(p_diff),
    }


# ---------------------------------------------------------------------- runs

FIT = re.compile(r"population \S+ v\d+: (\d+) patients, effect \S+, (\d+) steps in ([\d.]+) s")
RESCORED = re.compile(r"posterior \S+ v\d+: rescored, (\d+) scores republished")


def population_work(log_text: str) -> dict:
    """What the population side did in a worker, from its log: posteriors fitted
    (SVI steps, seconds in the fit thread) and rescorings of every patient after
    a new posterior (with the scores they republished)."""
    fits = [(int(m.group(2)), float(m.group(3))) for m in FIT.finditer(log_text)]
    rescored = [int(m.group(1)) for m in RESCORED.finditer(log_text)]
    return {
        "posteriors_fitted": len(fits),
        "svi_steps": sum(f[0] for f in fits),
        "fit_seconds": sum(f[1] for f in fits),
        "rescorings": len(rescored),
        "scores_republished_by_rescoring": sum(rescored),
    }


async def settle(
    broker: Settings, prefix: str, workers: list[WorkerProcess], patients: int, timeout: float
) -> tuple[float, bool]:
    """After the last reading: wait until the last posterior covers every patient
    and the workers have been quiet (< 0.2 core each) for three 2-s samples.
    Returns the seconds waited and whether they settled within ``timeout``."""
    started = time.monotonic()
    quiet = 0
    settled = False
    while time.monotonic() - started < timeout:
        before = [cpu_seconds(w.process.pid) for w in workers]
        await asyncio.sleep(2.0)
        busy = any(
            cpu_seconds(w.process.pid) - b > 0.4 for w, b in zip(workers, before, strict=True)
        )
        quiet = 0 if busy else quiet + 1
        if quiet >= 3:
            posteriors = [p for _, p in await read_topic(broker, prefix + "population-posterior")]
            latest = max(
                (p for p in posteriors if p.get("measure") == MEASURE),
                key=lambda p: p["version"],
                default=None,
            )
            if latest is not None and latest["num_patients"] >= patients:
                settled = True
                break
            quiet = 0
    return time.monotonic() - started, settled


async def one_run(name: str, broker: Settings, bootstrap: str, records, args, workers_n: int):
    run_id = uuid.uuid4().hex[:6]
    prefix, app_id = f"bf-{run_id}.", f"bf-{run_id}"
    await create_topics(broker, prefix, args.partitions)
    expected = expected_counts(records)
    readings = sum(expected.values())
    envs = [worker_env(bootstrap, prefix, app_id, args) for _ in range(workers_n)]
    workers = [WorkerProcess(env) for env in envs]
    collector = Collector(broker, prefix)
    await collector.start()
    prod = producer(broker)
    await prod.start()
    result: dict = {"name": name, "workers": workers_n, "prefix": prefix}
    load = [os.getloadavg()[0]]
    try:
        if name == "live" or name.startswith("burst"):
            spawned = time.monotonic()
            for w in workers:
                w.start()
            ready = await wait_ready(workers, spawned, 600)
            say(f"{name}: ready after {ready[0]['seconds']:.1f} s; producing")
            sent_at = time.time()
            cpu_from = [cpu_seconds(w.process.pid) for w in workers]
            if args.live_rate > 0 and name == "live":
                await send_paced(prod, prefix, records, args.live_rate)
            else:
                await send_all(prod, prefix, records)
            result["produce_seconds"] = time.time() - sent_at
            start_wall = sent_at
        else:
            sent_at = time.time()
            await send_all(prod, prefix, records)
            result["produce_seconds"] = time.time() - sent_at
            say(f"{name}: {len(records):,} records written in {result['produce_seconds']:.1f} s")
            spawned = time.monotonic()
            start_wall = time.time()
            for w in workers:
                w.start()
            ready = await wait_ready(workers, spawned, 600)
            cpu_from = [r["cpu_s"] for r in ready]
            say(f"{name}: ready after {[round(r['seconds'], 1) for r in ready]} s")
        await collector.wait(expected, args.timeout)
        done_at = max(
            ts for p in expected for ts, _ in collector.evidence.get(p, [])
        )  # Kafka timestamp of the last reading's evidence
        cpu_done = [cpu_seconds(w.process.pid) for w in workers]
        load.append(os.getloadavg()[0])
        say(f"{name}: every reading processed; waiting for the last posterior")
        settle_seconds, settled = await settle(
            broker, prefix, workers, len(expected), args.settle_timeout
        )
        if not settled:
            say(f"{name}: not quiet {settle_seconds:.0f} s after the last reading; comparing as is")
        metrics = [scrape_metrics(w.log_text()) for w in workers]
        cpu_end = [cpu_seconds(w.process.pid) for w in workers]
        alive = all(w.alive() for w in workers)
    finally:
        for w in workers:
            w.stop(timeout=120)
        await collector.stop()
        await prod.stop()
    wall = done_at - start_wall
    ready_wall = max(r["seconds"] for r in ready)
    cpu = [d - f for d, f in zip(cpu_done, cpu_from, strict=True)]
    result.update(
        records=len(records),
        readings=readings,
        patients=len(expected),
        ready_seconds=[r["seconds"] for r in ready],
        seconds_to_last_reading=wall,
        readings_per_s=readings / wall,
        readings_per_s_after_ready=readings / (wall - ready_wall)
        if name != "live"
        else readings / wall,
        worker_cpu_seconds_ready_to_done=cpu,
        worker_cpu_seconds_total=cpu_end,
        worker_cpu_seconds_at_ready=[r["cpu_s"] for r in ready],
        records_per_worker_cpu_s=len(records) / sum(cpu),
        records_per_worker_cpu_s_with_startup=len(records) / sum(cpu_done),
        settle_seconds=settle_seconds,
        settled=settled,
        event_loop_lag=[loop_lag(m) for m in metrics],
        scores_published_by_trigger=[
            {k: v for k, v in m.items() if k.startswith("efficacy_scores_published_total")}
            for m in metrics
        ],
        population_work=[population_work(w.log_text()) for w in workers],
        faust_timer_drift_max_s=[timer_drift_max(w.log_text()) for w in workers],
        workers_alive_at_end=alive,
        load_average_1m=load,
        log_paths=[str(w.log_path) for w in workers],
    )
    for env in envs:
        shutil.rmtree(env["EFFICACY_DATA_DIR"], ignore_errors=True)
    say(
        f"{name}: {readings:,} readings in {wall:.1f} s ({result['readings_per_s']:,.0f}/s; "
        f"{result['readings_per_s_after_ready']:,.0f}/s after ready), "
        f"{result['records_per_worker_cpu_s']:,.0f} records per worker CPU-s"
    )
    outputs = await final_outputs(broker, prefix)
    result["published"] = {
        k: outputs[k] for k in ("evidence_messages", "scores_published", "posteriors_published")
    }
    posterior = outputs["posterior"]
    if posterior is not None:
        result["final_posterior"] = {
            k: posterior.get(k)
            for k in ("version", "num_patients", "svi_steps", "evidence_digest", "converged")
        }
        result["final_posterior"]["effect"] = posterior["summary"]["effect"]
    return result, outputs


async def run(args: argparse.Namespace, bootstrap: str) -> dict:
    where = machine()
    broker = Settings(bootstrap_servers=bootstrap)
    patients = args.readings // args.obs_per_patient
    say(f"programme: {patients:,} patients × {args.obs_per_patient} readings")
    _, records = programme_records("b-", patients, args.obs_per_patient, seed=14)
    names = args.runs.split(",")
    runs, outputs = {}, {}
    for name in names:
        workers_n = 2 if name.endswith("2") else 1
        say(f"--- {name} ({workers_n} worker{'s' if workers_n > 1 else ''})")
        runs[name], outputs[name] = await one_run(name, broker, bootstrap, records, args, workers_n)
        write_json(args.out, {"runs": runs, "partial": True, "machine": where})
    comparisons = {}
    reference = "live" if "live" in outputs else names[0]
    for name in names:
        if name != reference:
            comparisons[f"{name}_vs_{reference}"] = compare(outputs[reference], outputs[name])
            say(f"{name} vs {reference}: {json.dumps(comparisons[f'{name}_vs_{reference}'])}")
    for one_name, two_name in (("backfill", "backfill2"), ("burst1", "burst2")):
        if one_name in outputs and two_name in outputs and reference != one_name:
            comparisons[f"{two_name}_vs_{one_name}"] = compare(outputs[one_name], outputs[two_name])
    result: dict = {"runs": runs, "comparisons": comparisons}
    for one_name, two_name in (("backfill", "backfill2"), ("burst1", "burst2")):
        if one_name not in runs or two_name not in runs:
            continue
        one, two = runs[one_name], runs[two_name]
        result[f"scale_out_{two_name}_vs_{one_name}"] = {
            "records_per_worker_cpu_s_one_worker": one["records_per_worker_cpu_s"],
            "records_per_worker_cpu_s_two_workers": two["records_per_worker_cpu_s"],
            "ratio_two_to_one": two["records_per_worker_cpu_s"] / one["records_per_worker_cpu_s"],
            "ratio_two_to_one_with_startup": two["records_per_worker_cpu_s_with_startup"]
            / one["records_per_worker_cpu_s_with_startup"],
            "wall_ratio_two_to_one": two["seconds_to_last_reading"]
            / one["seconds_to_last_reading"],
            "goal": "ratio within 20% of 1 (>= 0.8)",
        }
    result["parameters"] = {
        "readings": args.readings,
        "obs_per_patient": args.obs_per_patient,
        "patients": patients,
        "records": len(records),
        "records_by_topic": dict(collections.Counter(r.topic for r in records)),
        "measure": MEASURE,
        "partitions": args.partitions,
        "store": args.store,
        "live_rate": args.live_rate,
        "population_interval_seconds": args.population_interval,
        "selection": "off",
        "producer": "aiokafka, acks=all, linger 20 ms",
    }
    result["machine"] = where
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if bootstrap:
        result = asyncio.run(run(args, bootstrap))
    else:
        from cli.broker import LocalKafka

        kafka = LocalKafka(log=say)
        try:
            result = asyncio.run(run(args, kafka.start()))
        finally:
            kafka.stop()
    path = write_json(args.out, result)
    say(f"wrote {path}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.exit(main())
