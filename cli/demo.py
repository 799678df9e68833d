"""``efficacy demo``: the README's main job.

Starts the local Apache Kafka broker unless one is configured, a worker, and a
simulated programme (enrolments, wearables, labs, with a few bad and duplicate
records) published at a steady rate. The programme has true responders and true
non-responders (the simulator knows each patient's effect), and enough readings
per patient for calls to emerge while the user watches: a live summary of what
the pipeline publishes (the current rate, patients scored, calls, the population
effect with its interval, dead letters), until every patient's score is current under
the final population posterior (or ``seconds`` have passed). Then the calls
against the simulated truth: how many true non-responders were found, after how
many readings, and how many calls were wrong. Library warnings go to a log
file, not the terminal.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import statistics
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from cli.programme import build_programme
from cli.simulate import publish
from cli.worker_process import WorkerProcess
from streams.data_dir import data_dir_from_env
from streams.settings import Settings

MEASURES = ["resting_heart_rate", "hba1c"]
#: Readings per patient: daily wearable heart rate, HbA1c every few weeks.
READINGS = {"resting_heart_rate": 60, "hba1c": 8}
#: Between-patient spread of the true effect, in MCIDs: wide enough that the
#: programme has true non-responders (no benefit) next to true responders.
EFFECT_SD_MCID = 1.5
TRUTH_CLASSES = ("non_responder", "partial", "responder")
#: No new posterior or score for this long once every reading is fitted: the
#: rescoring after the final posterior is over (3 population intervals).
QUIET_SECONDS = 6.0
CALLS = ("non_responder", "uncertain", "responder", "insufficient_data")


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
    # (patient, measure) -> readings when the call first became non-responder
    first_nonresponder: dict[tuple[str, str], int] = field(default_factory=dict)
    rate: float = 0.0  # events/s sent over the last report interval
    last_change: float = 0.0  # monotonic time of the latest score or posterior
    _last: tuple[float, int] = (0.0, 0)

    def take(self, topic: str, value: bytes) -> None:
        body = json.loads(value)
        if topic in ("scores", "population-posterior"):
            self.last_change = time.monotonic()
        if topic == "scores":
            self.scores[body["patient_id"]] = body
            for m in body["measures"]:
                if m["classification"] == "non_responder":
                    readings = m["count_exposed"] + m["count_unexposed"]
                    self.first_nonresponder.setdefault((body["patient_id"], m["measure"]), readings)
        elif topic == "population-posterior":
            if body["version"] > self.posteriors.get(body["measure"], {}).get("version", 0):
                self.posteriors[body["measure"]] = body
        elif topic == "deadletter":
            self.dead_letters[body["reason"]] += 1
        elif topic == "alerts":
            self.alerts[body["kind"]] += 1

    def calls(self) -> Counter[str]:
        return Counter(m["classification"] for s in self.scores.values() for m in s["measures"])

    def tick(self, elapsed: float) -> None:
        """Update the current send rate (events/s since the previous tick)."""
        then, sent = self._last
        if elapsed > then:
            self.rate = (self.sent - sent) / (elapsed - then)
        self._last = (elapsed, self.sent)

    def settled(self, measures: list[str], quiet: float) -> bool:
        """Every patient's latest score covers ``measures``, and neither a
        posterior nor a score has arrived for ``quiet`` seconds: the final
        posterior has been published and the rescoring after it is over (it
        republishes only the scores it changed materially)."""
        return (
            bool(self.scores)
            and all(
                sorted(m["measure"] for m in score["measures"]) == sorted(measures)
                for score in self.scores.values()
            )
            and time.monotonic() - self.last_change >= quiet
        )

    def lines(self, elapsed: float) -> list[str]:
        calls = self.calls()
        lines = [
            f"t={elapsed:5.1f}s  sent {self.sent} events ({self.rate:,.0f}/s now)"
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

    from streams.kafka_options import aiokafka_options

    names = ["scores", "population-posterior", "deadletter", "alerts"]
    consumer = AIOKafkaConsumer(
        *(settings.topic(n) for n in names),
        **aiokafka_options(settings),
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
                summary.tick(last_report - started)
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


def truth_class(effect: float, direction: str, mcid: float) -> str:
    """A patient's true class from their true effect: no benefit (non-responder),
    a benefit of at least the MCID (responder), or less (partial)."""
    benefit = effect if direction == "higher" else -effect
    if benefit <= 0:
        return "non_responder"
    return "responder" if benefit >= mcid else "partial"


def truth_table(scores: dict[str, dict], truth: dict) -> dict[str, dict[str, Counter[str]]]:
    """Per measure, per true class, the count of each latest call. ``truth`` is
    the programme's ground truth as JSON (``Programme.truth``)."""
    table: dict[str, dict[str, Counter[str]]] = {}
    for patient, score in scores.items():
        for m in score["measures"]:
            measure = truth["measures"][m["measure"]]
            effect = truth["patients"][patient]["effect"][m["measure"]]
            true = truth_class(effect, measure["direction"], measure["mcid"])
            table.setdefault(m["measure"], {c: Counter() for c in TRUTH_CLASSES})
            table[m["measure"]][true][m["classification"]] += 1
    return table


def truth_lines(summary: Summary, truth: dict) -> list[str]:
    """The calls against the simulated truth, as printed at the end."""
    lines = []
    for measure, rows in sorted(truth_table(summary.scores, truth).items()):
        lines.append(f"{measure}: true class -> latest calls ({', '.join(CALLS)})")
        for true in TRUTH_CLASSES:
            counts = rows[true]
            lines.append(
                f"  {true:>13}: {sum(counts.values()):3d} patients -> "
                + ", ".join(f"{counts.get(c, 0)}" for c in CALLS)
            )
        non = rows["non_responder"]
        found = non.get("non_responder", 0)
        early = [
            readings
            for (patient, m), readings in summary.first_nonresponder.items()
            if m == measure
            and truth_class(
                truth["patients"][patient]["effect"][m],
                truth["measures"][m]["direction"],
                truth["measures"][m]["mcid"],
            )
            == "non_responder"
        ]
        when = (
            f", first called after a median {statistics.median(early):g} readings" if early else ""
        )
        false_calls = rows["responder"].get("non_responder", 0) + non.get("responder", 0)
        lines.append(
            f"  found {found} of {sum(non.values())} true non-responders{when} "
            f"(of {READINGS[measure]} each); false calls: {false_calls} "
            "(non-responder for a true responder, or responder for a true non-responder)"
        )
    return lines


def reading_hint(bootstrap: str | None, prefix: str) -> str:
    """How to read this run's scores and alerts with the project's own commands:
    on a configured broker the topics stay (the commands for this run's prefix);
    the local broker goes with the demo, so how to run it against one that stays."""
    if bootstrap is not None:
        env = f"KAFKA_BOOTSTRAP_SERVERS={bootstrap} EFFICACY_TOPIC_PREFIX={prefix}"
        return (
            "read them with:\n"
            f"  {env} efficacy scores --call non_responder\n"
            f"  {env} efficacy alerts --kind transition"
        )
    return (
        "the local broker stops with the demo; to read scores while it runs, start one "
        "that stays:\n"
        "  python -m cli.broker start        # prints the bootstrap servers\n"
        "  export KAFKA_BOOTSTRAP_SERVERS=<those> EFFICACY_TOPIC_PREFIX=demo.\n"
        "  efficacy demo                     # and, in another shell with the same two:\n"
        "  efficacy scores --call non_responder\n"
        "  efficacy alerts --follow"
    )


def run_demo(
    seconds: float = 300.0,
    patients: int = 200,
    cohorts: int = 8,
    rate: float = 250.0,
    truth_file: Path | None = None,
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
            "EFFICACY_DATA_DIR": str(data_dir_from_env() / f"demo-{run_id}"),
        }
        settings = Settings(
            bootstrap_servers=bootstrap,
            topic_prefix=env["EFFICACY_TOPIC_PREFIX"],
            app_id=env["EFFICACY_APP_ID"],
        )
        worker = stack.enter_context(WorkerProcess(env))
        say(f"worker started (log: {worker.log_path})")
        # Library warnings (aiokafka's retries while topics are created) go to a
        # file next to the worker's log, not to the terminal.
        library_log = worker.log_path.with_name(f"efficacy-demo-{run_id}-libraries.log")
        logging.basicConfig(filename=library_log, level=logging.WARNING, force=True)
        from streams.catalogue import Catalogue

        catalogue = Catalogue.load(settings.measures_file)
        programme = build_programme(
            MEASURES,
            num_patients=patients,
            num_cohorts=cohorts,
            obs_per_patient=READINGS["resting_heart_rate"],
            seed=int(run_id, 16) % 1000,
            bad_fraction=0.01,
            duplicate_fraction=0.01,
            spec_overrides={
                m: {
                    "obs_per_patient": READINGS[m],
                    "effect_sd": EFFECT_SD_MCID * catalogue.get(m).mcid,
                }
                for m in MEASURES
            },
        )
        truth = json.loads(programme.truth.model_dump_json())
        if truth_file is not None:
            truth_file.write_text(json.dumps(truth, indent=1))
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
            }  # every reading in the population fit, every score on its final posterior
            return (
                s.sent >= total
                and len(s.scores) >= patients
                and round(sum(covered.values())) >= readings
                and s.settled(MEASURES, QUIET_SECONDS)
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
        if finished:
            versions = ", ".join(
                f"{m} v{p['version']}" for m, p in sorted(summary.posteriors.items())
            )
            say(
                f"final population posteriors {versions}; every score is current under them "
                f"(no new posterior or score for {QUIET_SECONDS:g} s)"
            )
        say("calls against the simulated truth:")
        for line in truth_lines(summary, truth):
            say("  " + line)
        say(
            ("the programme is fully scored. " if finished else "time is up. ")
            + f"Scores are JSON on the topic {settings.topic('scores')} (key: patient id); "
            + reading_hint(bootstrap if configured else None, settings.topic_prefix)
        )
    return 0 if summary.scores else 1
