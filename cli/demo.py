"""``efficacy demo``: the README's main job.

Starts the local Apache Kafka broker unless one is configured, a worker, and a
simulated programme (enrolments, wearables, labs, with a few bad and duplicate
records) published at a steady rate; shows a live summary of what the pipeline
publishes (events per second, patients scored, calls, the population effect
with its interval, dead letters) until the programme is fully scored or
``seconds`` have passed; then says how to read the scores yourself.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field

from cli.programme import build_programme
from cli.simulate import publish
from cli.worker_process import WorkerProcess
from streams.settings import Settings

MEASURES = ["resting_heart_rate", "hba1c"]


def say(message: str) -> None:
    print(f"[demo] {message}", flush=True)


@dataclass
class Summary:
    """What the demo has seen on the output topics so far."""

    scores: dict[str, dict] = field(default_factory=dict)  # latest per patient
    posteriors: dict[str, dict] = field(default_factory=dict)  # latest per measure
    dead_letters: Counter[str] = field(default_factory=Counter)
    alerts: Counter[str] = field(default_factory=Counter)
    sent: int = 0

    def take(self, topic: str, value: bytes) -> None:
        body = json.loads(value)
        if topic == "scores":
            self.scores[body["patient_id"]] = body
        elif topic == "population-posterior":
            if body["version"] > self.posteriors.get(body["measure"], {}).get("version", 0):
                self.posteriors[body["measure"]] = body
        elif topic == "deadletter":
            self.dead_letters[body["reason"]] += 1
        elif topic == "alerts":
            self.alerts[body["kind"]] += 1

    def calls(self) -> Counter[str]:
        return Counter(m["classification"] for s in self.scores.values() for m in s["measures"])

    def lines(self, elapsed: float) -> list[str]:
        calls = self.calls()
        lines = [
            f"t={elapsed:5.1f}s  sent {self.sent} events ({self.sent / max(elapsed, 1e-9):,.0f}/s)"
            f"  patients scored {len(self.scores)}  dead-lettered {sum(self.dead_letters.values())}",
            "        calls: "
            + ", ".join(
                f"{k} {calls.get(k, 0)}"
                for k in ("responder", "non_responder", "uncertain", "insufficient_data")
            ),
        ]
        for measure, posterior in sorted(self.posteriors.items()):
            effect = posterior["summary"]["effect"]
            lines.append(
                f"        {measure}: population effect {effect['mean']:+.3g} "
                f"(90% {effect['lower']:+.3g} to {effect['upper']:+.3g}), "
                f"v{posterior['version']}, {posterior['num_patients']} patients"
            )
        return lines


async def _watch(
    settings: Settings, summary: Summary, seconds: float, done, started: float
) -> None:
    from aiokafka import AIOKafkaConsumer

    names = ["scores", "population-posterior", "deadletter", "alerts"]
    consumer = AIOKafkaConsumer(
        *(settings.topic(n) for n in names),
        bootstrap_servers=settings.bootstrap_servers,
        auto_offset_reset="earliest",
        metadata_max_age_ms=1000,
        fetch_max_bytes=64 * 1024 * 1024,
        max_partition_fetch_bytes=32 * 1024 * 1024,
    )
    await consumer.start()
    last_report = 0.0
    try:
        while time.monotonic() - started < seconds and not done(summary):
            batch = await consumer.getmany(timeout_ms=500)
            for records in batch.values():
                for record in records:
                    summary.take(record.topic.removeprefix(settings.topic_prefix), record.value)
            if time.monotonic() - last_report >= 3.0:
                last_report = time.monotonic()
                for line in summary.lines(last_report - started):
                    say(line)
    finally:
        await consumer.stop()


def _example_scores(summary: Summary, count: int = 3) -> list[str]:
    lines = []
    for patient, score in sorted(summary.scores.items())[:count]:
        for m in score["measures"]:
            e = m["effect"]
            lines.append(
                f"{patient} {m['measure']}: effect {e['mean']:+.2f} {m['unit']} "
                f"(90% {e['lower']:+.2f} to {e['upper']:+.2f}), "
                f"P(benefit >= MCID {m['mcid']:g}) = {m['p_benefit_ge_mcid']:.2f}, "
                f"{m['classification']}"
                + (f" -> {m['recommended_action']}" if m["recommended_action"] else "")
            )
    return lines


def run_demo(
    seconds: float = 300.0, patients: int = 200, cohorts: int = 8, rate: float = 3000.0
) -> int:
    from cli.broker import LocalKafka

    configured = os.environ.get("EFFICACY_BOOTSTRAP_SERVERS") or os.environ.get(
        "KAFKA_BOOTSTRAP_SERVERS"
    )
    run_id = uuid.uuid4().hex[:6]
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        if configured:
            bootstrap = configured
            say(f"using the configured Kafka broker at {bootstrap}")
        else:
            kafka = stack.enter_context(LocalKafka(log=say))
            bootstrap = kafka.bootstrap_servers
        env = {
            "EFFICACY_BOOTSTRAP_SERVERS": bootstrap,
            "EFFICACY_TOPIC_PREFIX": os.environ.get("EFFICACY_TOPIC_PREFIX", f"demo-{run_id}."),
            "EFFICACY_APP_ID": os.environ.get("EFFICACY_APP_ID", f"efficacy-demo-{run_id}"),
            "EFFICACY_WEB_ENABLED": "false",
            "EFFICACY_METRICS_PORT": os.environ.get("EFFICACY_METRICS_PORT", "0"),
            "EFFICACY_DATA_DIR": os.environ.get("EFFICACY_DATA_DIR", f".cache/faust/demo-{run_id}"),
        }
        settings = Settings(
            bootstrap_servers=bootstrap,
            topic_prefix=env["EFFICACY_TOPIC_PREFIX"],
            app_id=env["EFFICACY_APP_ID"],
        )
        worker = stack.enter_context(WorkerProcess(env))
        say(f"worker started (log: {worker.log_path})")
        programme = build_programme(
            MEASURES,
            num_patients=patients,
            num_cohorts=cohorts,
            obs_per_patient=20,
            seed=int(run_id, 16) % 1000,
            bad_fraction=0.01,
            duplicate_fraction=0.01,
        )
        total = sum(len(records) for records in programme.records.values())
        say(
            f"publishing a simulated programme: {patients} patients in {cohorts} clinics, "
            f"{', '.join(MEASURES)}; {total} records at {rate:,.0f}/s"
        )
        summary = Summary()
        readings = programme.truth.valid_unique_readings

        def done(s: Summary) -> bool:
            covered = {
                m: p["num_observations"] for m, p in s.posteriors.items()
            }  # every reading is in the population fit and every patient scored
            return (
                s.sent >= total
                and len(s.scores) >= patients
                and round(sum(covered.values())) >= readings
            )

        def progress(sent: int, _total: int, _elapsed: float, _final: bool) -> None:
            summary.sent = sent

        async def main() -> None:
            producer = asyncio.create_task(
                publish(programme, settings, rate=rate, progress=progress)
            )
            await _watch(settings, summary, seconds, done, started)
            if not producer.done():
                producer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await producer

        asyncio.run(main())
        for line in summary.lines(time.monotonic() - started):
            say(line)
        if not worker.alive():
            say("the worker stopped unexpectedly:\n" + worker.log_tail())
            return 1
        say("example scores:")
        for line in _example_scores(summary):
            say("  " + line)
        finished = done(summary)
        say(
            ("the programme is fully scored. " if finished else "time is up. ")
            + f"Scores are JSON on the topic {settings.topic('scores')} (key: patient id); "
            "to read them while a broker runs:\n"
            "  python -m cli.broker start          # prints the bootstrap servers\n"
            "  KAFKA_BOOTSTRAP_SERVERS=<that> efficacy demo   # and, in another shell,\n"
            "  KAFKA_BOOTSTRAP_SERVERS=<that> efficacy scores --call non_responder\n"
            "  KAFKA_BOOTSTRAP_SERVERS=<that> efficacy alerts --follow"
        )
    return 0 if summary.scores else 1
