"""The population side of one measure: every patient's latest statistics in
growable arrays, and the warm-started variational update that turns them into a
versioned PopulationPosterior message (pure: no Kafka).

Evidence messages carry a patient's *whole* current statistics, not a delta:
the book keeps the last one per patient, so a re-delivered message changes
nothing and the book can be rebuilt from the compacted table at any time.
"""

from __future__ import annotations

import time
import zlib
from dataclasses import dataclass
from datetime import UTC, datetime

import jax
import numpy as np

from model.config import ModelConfig, SVIConfig
from model.evidence import PatientStats, decay_to
from model.offline import SUMMARY_DRAWS, describe, population_quantities
from model.population import Evidence, FitState, PopulationFitter, UpdateInfo, pad_evidence
from model.scores import cohort_posteriors
from streams.schemas import Interval, PatientEvidence, PopulationPosterior
from streams.scoring import DRAW_FIELDS

#: Warm updates of 100 steps (two chunks, so convergence can be judged from the
#: change of the ELBO between them); everything else as tuned offline.
STREAMING_SVI = SVIConfig(update_steps=100)


class PopulationBook:
    """Latest statistics of every patient of one measure (standardised units)."""

    def __init__(self, measure: str, model: ModelConfig) -> None:
        self.measure = measure
        self.model = model
        d = model.stat_dim
        self._rows: dict[str, int] = {}
        self._gram = np.zeros((64, d, d))
        self._recent = np.zeros((64, d, d))  # recent-window statistics (zeros: none)
        self._reference = np.full(64, -np.inf)
        self._cohort = np.zeros(64, dtype=np.int32)
        self.cohorts: list[str] = []
        self._cohort_index: dict[str, int] = {}
        self.changes_since_fit = 0

    @property
    def num_patients(self) -> int:
        return len(self._rows)

    def put(self, evidence: PatientEvidence) -> None:
        """Record a patient's latest statistics (last write wins)."""
        row = self._rows.get(evidence.patient_id)
        if row is None:
            row = len(self._rows)
            if row == self._gram.shape[0]:
                self._grow()
            self._rows[evidence.patient_id] = row
        cohort = self._cohort_index.get(evidence.cohort)
        if cohort is None:
            cohort = self._cohort_index[evidence.cohort] = len(self.cohorts)
            self.cohorts.append(evidence.cohort)
        self._gram[row] = np.asarray(evidence.gram, dtype=float)
        self._recent[row] = 0.0 if evidence.recent_gram is None else evidence.recent_gram
        self._reference[row] = evidence.reference_time
        self._cohort[row] = cohort
        self.changes_since_fit += 1

    def _grow(self) -> None:
        size = 2 * self._gram.shape[0]
        self._gram = np.concatenate([self._gram, np.zeros_like(self._gram)])
        self._recent = np.concatenate([self._recent, np.zeros_like(self._recent)])
        self._reference = np.concatenate([self._reference, np.full(size // 2, -np.inf)])
        self._cohort = np.concatenate([self._cohort, np.zeros(size // 2, dtype=np.int32)])

    def snapshot(self) -> tuple[PatientStats, np.ndarray, list[str]]:
        """A copy of the statistics at a common reference time (the latest event:
        with forgetting, everyone's evidence is weighted as of "now"), the cohort
        index of every patient, and the cohort labels."""
        n = self.num_patients
        stats = PatientStats(
            gram=self._gram[:n].copy(),
            reference_time=self._reference[:n].copy(),
            count_exposed=np.zeros(n, dtype=np.int64),
            count_unexposed=np.zeros(n, dtype=np.int64),
        )
        return self._at_now(stats, self.model), self._cohort[:n].copy(), list(self.cohorts)

    def recent_snapshot(self) -> PatientStats | None:
        """The recent-window statistics (ModelConfig.recent_window) of every
        patient, rows as in ``snapshot``, at the same common reference time;
        None when the model has no recent window."""
        window = self.model.recent_window
        if window is None:
            return None
        n = self.num_patients
        stats = PatientStats(
            gram=self._recent[:n].copy(),
            reference_time=self._reference[:n].copy(),
            count_exposed=np.zeros(n, dtype=np.int64),
            count_unexposed=np.zeros(n, dtype=np.int64),
        )
        return self._at_now(stats, window)

    def _at_now(self, stats: PatientStats, model: ModelConfig) -> PatientStats:
        """Re-base every patient's weights to the latest event time of all."""
        finite = self._reference[: self.num_patients]
        finite = finite[np.isfinite(finite)]
        return decay_to(stats, float(finite.max()), model) if finite.size else stats


def _key(measure: str, version: int) -> jax.Array:
    """Draws are fixed by (measure, version): scores are reproducible."""
    return jax.random.fold_in(jax.random.PRNGKey(zlib.crc32(measure.encode())), version)


@dataclass
class FitResult:
    message: PopulationPosterior
    info: UpdateInfo  # of the last round
    seconds: float


class FitterPool:
    """One PopulationFitter per model *structure*, shared by every measure.

    The fit works on standardised Gram matrices, so the standardisation (which
    differs per measure) plays no part in it: measures with the same structure
    and priors share one fitter, hence one compilation per padded shape instead
    of one per measure. The initial variational state depends on the structure
    only, so ``svi.init`` (slow: numpyro traces the model eagerly) runs once.
    """

    def __init__(self, svi: SVIConfig | None = None) -> None:
        self.svi = svi or STREAMING_SVI
        self._fitters: dict[ModelConfig, PopulationFitter] = {}
        self._initial: dict[int, FitState] = {}

    def fitter(self, model: ModelConfig) -> PopulationFitter:
        structure = model.structure
        if structure not in self._fitters:
            self._fitters[structure] = PopulationFitter(structure, self.svi)
        return self._fitters[structure]

    def initial_state(self, fitter: PopulationFitter, evidence: Evidence) -> FitState:
        if id(fitter) not in self._initial:
            self._initial[id(fitter)] = fitter.init(jax.random.PRNGKey(0), evidence)
        return self._initial[id(fitter)]


class PopulationModel:
    """The variational state of one measure; ``fit`` is the sequential update."""

    def __init__(
        self,
        measure: str,
        model: ModelConfig,
        svi: SVIConfig | None = None,
        max_rounds: int = 20,
        pool: FitterPool | None = None,
    ) -> None:
        self.measure = measure
        self.model = model
        self.pool = pool or FitterPool(svi)
        self.fitter = self.pool.fitter(model)
        self.max_rounds = max_rounds
        self.state: FitState | None = None
        self.version = 0

    def fit(self, stats: PatientStats, cohort: np.ndarray, cohorts: list[str]) -> FitResult:
        """Continue SVI against all evidence (fresh on the first call) and build
        the next posterior message. Blocking; run it off the event loop."""
        started = time.perf_counter()
        evidence = pad_evidence(stats, cohort, max(len(cohorts), 1))
        version = self.version + 1
        key = _key(self.measure, version)
        key_fit, key_draws, key_summary = jax.random.split(key, 3)
        state = self.state or self.pool.initial_state(self.fitter, evidence)
        state, info = self.fitter.update(state, evidence, key_fit)
        steps = info.steps
        # A warm update is bounded, but when much new evidence arrived at once q
        # has further to go: continue until the ELBO stops moving (or the cap).
        for round_ in range(self.max_rounds):
            if info.converged:
                break
            state, info = self.fitter.update(
                state, evidence, jax.random.fold_in(key_fit, round_ + 1)
            )
            steps += info.steps
        draws = self.fitter.draws(state, key_draws)
        cohort_mean, cohort_var = cohort_posteriors(
            draws, evidence.gram, evidence.cohort, evidence.num_cohorts, self.model.structure
        )
        g = len(cohorts)
        quantities = population_quantities(
            self.fitter.draws(state, key_summary, SUMMARY_DRAWS), self.model
        )
        summary = {}
        for name, values in quantities.items():
            described = describe(values)
            if described is not None:
                summary[name] = Interval(
                    mean=described["mean"],
                    sd=described["sd"],
                    lower=described["q05"],
                    upper=described["q95"],
                )
        transform = self.fitter.guide.get_transform(self.fitter.params(state))
        std = self.model.standardization
        message = PopulationPosterior(
            event_id=f"posterior:{self.measure}:{version}",
            event_time=datetime.now(UTC),
            measure=self.measure,
            version=version,
            num_patients=stats.num_patients,
            num_observations=float(stats.gram[:, 0, 0].sum()),
            elbo=info.elbo,
            svi_steps=steps,
            converged=info.converged,
            standardization=std.model_dump(),
            draws={f: np.asarray(getattr(draws, f)).tolist() for f in DRAW_FIELDS},
            cohorts=cohorts,
            cohort_mean=np.asarray(cohort_mean)[:, :g].tolist(),
            cohort_var=np.asarray(cohort_var)[:, :g].tolist(),
            summary=summary,
            unconstrained_loc=np.asarray(transform.loc).tolist(),
            unconstrained_scale_tril=np.asarray(transform.scale_tril).tolist(),
        )
        self.state, self.version = state, version
        return FitResult(message, info, time.perf_counter() - started)
