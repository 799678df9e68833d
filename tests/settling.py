"""What "settled" means for a broker-backed run, and polling with a deadline.

Tests wait on conditions, never on fixed sleeps: ``poll`` calls a probe until a
predicate holds or a deadline passes and hands back the last value for the
caller to assert on (so a timeout fails with what was last seen, not a bare
"timed out").

A run over a simulated programme has *settled* (``Settling``) when

1. the newest population posterior (highest version) was fitted on every
   unique valid reading of the programme;
2. every enrolled patient has a latest score that counts all of the patient's
   unique valid readings (count_exposed + count_unexposed);
3. every latest score was computed under the last published posterior, as far
   as the worker's publication contract makes that observable. The contract
   (streams.app ``on_new_posterior`` -> PatientsService.rescore_all,
   streams.scoring.changed_materially): after every new posterior version each
   worker rescores all its patients and republishes

   - every score when the posterior says ``rescore`` (it moved materially, or
     the drift detector is warming up);
   - otherwise only the scores that changed materially against the patient's
     last *published* score: a different call, the mean moved by ≥ 0.1
     posterior sd, the sd by ≥ 5 %, or P(benefit ≥ MCID) by ≥ 0.02.

   So a latest score may legitimately carry an older version than the last.
   The check is then: its version is at least the last version that said
   ``rescore``, and it is within those materiality thresholds (strictly) of the
   score this test recomputes under the last posterior from the batch
   statistics of the patient's readings (streams.scoring.measure_scores with
   the published call as the hysteresis state, as the worker does). A score
   published under the last version must equal the recomputation (to 1e-6
   posterior sd: both are deterministic functions of evidence and version).
   The thresholds are written out here, not imported, so a worker that
   loosened them would fail.

A worker that skips the rescoring after a new posterior leaves scores computed
under an early posterior (or none, for patients whose readings all arrived
before the first posterior) and never settles. So that such a run fails in
a minute or two rather than at the read's timeout, ``Settling`` also stops the
read once the final posterior covers every reading and nothing new arrived on
the read topics for ``idle_seconds``; ``problems`` then says what is not
settled.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any, TypeVar

from cli.programme import Programme
from model.config import DecisionRule
from streams.app import measure_models
from streams.catalogue import Catalogue
from streams.patient_state import MeasureStats
from streams.scoring import MeasurePosterior, measure_scores
from streams.settings import Settings

# The worker's materiality thresholds (streams.scoring.changed_materially).
MEAN_SHIFT_SD = 0.1
SD_CHANGE = 0.05
P_MCID_CHANGE = 0.02
# A score published under the last version is recomputed exactly, up to float
# reduction order (blocked, padded jit batches): far below any threshold.
EXACT_SD = 1e-6

T = TypeVar("T")


def poll(
    probe: Callable[[], T],
    done: Callable[[T], bool] = bool,
    *,
    timeout: float,
    interval: float = 1.0,
) -> T:
    """Call ``probe`` until ``done(value)`` or ``timeout`` seconds passed; return
    the last value (the caller asserts on it)."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if done(value) or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


def latest_by_key(records) -> dict:
    latest = {}
    for record in sorted(records, key=lambda r: (r.partition, r.offset)):
        latest[record.key] = record
    return latest


class Settling:
    """``done`` for cli.kafka_io.read_until over the posterior and score
    topics of a run (module docstring); ``problems(records)`` lists what is not
    settled (empty: settled)."""

    def __init__(
        self,
        programme: Programme,
        prefix: str,
        measure: str,
        idle_seconds: float = 90.0,
    ) -> None:
        self.programme = programme
        self.truth = programme.truth
        self.measure = measure
        self.posterior_topic = prefix + "population-posterior"
        self.scores_topic = prefix + "scores"
        self.idle_seconds = idle_seconds
        self.patients = sorted(self.truth.patients)
        self.readings = {p: self.truth.patients[p].valid_unique_readings[measure]
                         for p in self.patients}  # fmt: skip
        self.catalogue = Catalogue.load()
        self.model = measure_models(self.catalogue, Settings())[measure]
        self.rule = DecisionRule()
        self._stats: list[MeasureStats] | None = None
        self._recomputed: dict[int, dict[str, Any]] = {}  # by posterior version
        self._seen = 0
        self._last_change = time.monotonic()
        self.gave_up = False
        self._parsed: dict[tuple, dict] = {}

    def value(self, record) -> dict:
        """The record's JSON value, parsed once (done() runs every half second)."""
        key = (record.topic, record.partition, record.offset)
        if key not in self._parsed:
            self._parsed[key] = json.loads(record.value)
        return self._parsed[key]

    # -- the three conditions ---------------------------------------------------------

    def final_posterior(self, records) -> dict | None:
        posteriors = [self.value(r) for r in records if r.topic == self.posterior_topic]
        return max(posteriors, key=lambda p: p["version"]) if posteriors else None

    def latest_scores(self, records) -> dict[str, dict]:
        scores = latest_by_key(r for r in records if r.topic == self.scores_topic)
        return {k.decode(): self.value(r) for k, r in scores.items()}

    def problems(self, records) -> list[str]:
        final = self.final_posterior(records)
        if final is None:
            return ["no population posterior"]
        valid = self.truth.measures[self.measure].valid_unique_readings
        if round(final["num_observations"]) != valid:
            return [f"the last posterior v{final['version']} has {final['num_observations']:.0f} "
                    f"of {valid} readings"]  # fmt: skip
        scores = self.latest_scores(records)
        missing = [p for p in self.patients if p not in scores]
        if missing:
            return [f"{len(missing)} patients without a score, e.g. {missing[:3]}"]
        problems = []
        for patient in self.patients:
            (m,) = scores[patient]["measures"]
            counted = m["count_exposed"] + m["count_unexposed"]
            if counted != self.readings[patient]:
                problems.append(f"{patient}: score counts {counted} of {self.readings[patient]} "
                                f"readings (v{m['population_version']})")  # fmt: skip
        if problems:
            return problems
        return self.stale(records, final, scores)

    def stale(self, records, final: dict, scores: dict[str, dict]) -> list[str]:
        """Scores not computed under the last posterior (module docstring, 3)."""
        posteriors = {}
        for r in records:
            if r.topic == self.posterior_topic:
                message = self.value(r)
                posteriors[message["version"]] = message
        forced = max((v for v, p in posteriors.items() if p["rescore"]), default=0)
        last = final["version"]
        recomputed = self.recompute(final, scores)
        problems = []
        for patient in self.patients:
            (m,) = scores[patient]["measures"]
            new = recomputed[patient]
            version = m["population_version"]
            sd = max(new["sd"], 1e-12)
            if version == last:
                if (
                    abs(m["effect"]["mean"] - new["mean"]) > EXACT_SD * sd
                    or abs(m["effect"]["sd"] - new["sd"]) > EXACT_SD * sd
                ):
                    problems.append(f"{patient}: the v{last} score differs from its recomputation")
                continue
            if version < forced:
                problems.append(f"{patient}: score under v{version}, but v{forced} asked for "
                                f"every score to be republished (last v{last})")  # fmt: skip
                continue
            moved = [
                name
                for name, gap in (
                    ("call", m["classification"] != new["classification"]),
                    ("mean", abs(m["effect"]["mean"] - new["mean"]) >= MEAN_SHIFT_SD * sd),
                    ("sd", abs(m["effect"]["sd"] - new["sd"]) >= SD_CHANGE * sd),
                    ("p_mcid", abs(m["p_benefit_ge_mcid"] - new["p_mcid"]) >= P_MCID_CHANGE),
                )
                if gap
            ]
            if moved:
                problems.append(f"{patient}: score under v{version} differs materially ("
                                f"{', '.join(moved)}) from its score under the last v{last}")  # fmt: skip
        return problems

    def recompute(self, final: dict, scores: dict[str, dict]) -> dict[str, dict]:
        """Every patient's score under ``final`` from the batch statistics of the
        unique valid readings, with the published call as hysteresis state."""
        calls = tuple(scores[p]["measures"][0]["classification"] for p in self.patients)
        key = (final["version"], calls)
        if key not in self._recomputed:
            from streams.schemas import PopulationPosterior

            posterior = MeasurePosterior.from_message(PopulationPosterior.model_validate(final))
            out = measure_scores(
                posterior,
                self.statistics(),
                [self.truth.patients[p].cohort for p in self.patients],
                [[] for _ in self.patients],
                self.catalogue.get(self.measure),
                self.model,
                self.rule,
                previous=list(calls),
            )
            self._recomputed = {key: {
                p: {"mean": s.effect.mean, "sd": s.effect.sd, "p_mcid": s.p_benefit_ge_mcid,
                    "classification": s.classification}
                for p, s in zip(self.patients, out, strict=True)
            }}  # fmt: skip
        return self._recomputed[key]

    def statistics(self) -> list[MeasureStats]:
        if self._stats is None:
            stats = self.programme.expected_statistics(self.measure, self.model, self.patients)
            self._stats = [
                MeasureStats(
                    gram=stats.gram[i].tolist(),
                    reference_time=float(stats.reference_time[i]),
                    count_exposed=int(stats.count_exposed[i]),
                    count_unexposed=int(stats.count_unexposed[i]),
                )
                for i in range(len(self.patients))
            ]
        return self._stats

    # -- read_until's done ---------------------------------------------------------------

    def __call__(self, records) -> bool:
        now = time.monotonic()
        if len(records) != self._seen:
            self._seen, self._last_change = len(records), now
            cheap = self._cheap_settled(records)
            return cheap and not self.problems(records)
        if now - self._last_change >= self.idle_seconds and self._evidence_complete(records):
            self.gave_up = True  # quiet with the evidence complete: problems() says why
            return True
        return False

    def _evidence_complete(self, records) -> bool:
        """Condition 1: the last posterior was fitted on every valid reading."""
        final = self.final_posterior(records)
        valid = self.truth.measures[self.measure].valid_unique_readings
        return final is not None and round(final["num_observations"]) == valid

    def _cheap_settled(self, records) -> bool:
        """Conditions 1 and 2 in number only (before the recomputation)."""
        return self._evidence_complete(records) and (
            len(self.latest_scores(records)) == len(self.patients)
        )
