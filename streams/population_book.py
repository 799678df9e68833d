"""The population side of one measure: every patient's latest statistics in
growable arrays, the warm-started variational update that turns them into a
versioned PopulationPosterior message, and the structure selection that compares
pooling structures on them (pure: no Kafka).

Evidence messages carry a patient's *whole* current statistics, not a delta:
the book keeps the last one per patient, so a re-delivered message changes
nothing and the book can be rebuilt from the compacted table at any time.
"""

from __future__ import annotations

import logging
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import jax
import numpy as np

from model.config import ModelConfig, SVIConfig
from model.covariates import column_blocks, patient_design
from model.evidence import PatientStats, decay_to, gram_stats, stacked
from model.exported import ExportCache
from model.family_scores import family_cohort_posteriors
from model.offline import SUMMARY_DRAWS, coefficient_summaries, population_quantities
from model.population import Evidence, FitState, PopulationFitter, UpdateInfo, pad_evidence
from model.scores import (
    LevelPosteriors,
    cohort_posteriors,
    describe,
    level_pairs,
    level_posteriors,
)
from model.selection import (
    SELECTION_SVI,
    FitterCache,
    candidate_structures,
    choose,
    compare,
    cross_validate_folds,
    patient_folds,
)
from model.smooth import curve_summaries
from streams.schemas import (
    MISSING_GROUP,
    Coefficient,
    Interval,
    PatientEvidence,
    PopulationPosterior,
    StructureScore,
    StructureSelection,
)
from streams.scoring import DRAW_FIELDS, OPTIONAL_DRAW_FIELDS

log = logging.getLogger(__name__)

#: Warm updates of 100 steps (two chunks, so convergence can be judged from the
#: change of the ELBO between them); everything else as tuned offline.
STREAMING_SVI = SVIConfig(update_steps=100)


@dataclass(frozen=True)
class GroupLabels:
    """The further grouping levels of a book's patients: ``index`` (P, L) each
    patient's group at each level (ModelConfig.grouping_levels' order),
    ``labels`` each level's group labels (MISSING_GROUP for a missing attribute)."""

    index: np.ndarray
    labels: list[list[str]]


class PopulationBook:
    """Latest statistics of every patient of one measure (standardised units)."""

    def __init__(self, measure: str, model: ModelConfig) -> None:
        self.measure = measure
        self.model = model
        shape = model.stat_shape  # Gram matrices, or a family measure's cells
        self._rows: dict[str, int] = {}
        self._gram = np.zeros((64, *shape))
        self._recent = np.zeros((64, *shape))  # recent-window statistics (zeros: none)
        self._reference = np.full(64, -np.inf)
        self._cohort = np.zeros(64, dtype=np.int32)
        self._readings = np.zeros(64, dtype=np.int64)  # readings the statistics count
        self._covariates = np.zeros((64, model.num_covariates))  # design rows, natural units
        self.cohorts: list[str] = []
        self._cohort_index: dict[str, int] = {}
        # Each further grouping level's group of every patient, and its labels.
        self._groups = np.zeros((64, len(model.grouping_levels)), dtype=np.int32)
        self.group_labels: list[list[str]] = [[] for _ in model.grouping_levels]
        self._group_index: list[dict[str, int]] = [{} for _ in model.grouping_levels]
        self.changes_since_fit = 0

    @property
    def num_patients(self) -> int:
        return len(self._rows)

    @property
    def patient_ids(self) -> list[str]:
        """The patients in the order of the snapshots' rows."""
        return list(self._rows)

    def put(self, evidence: PatientEvidence) -> bool:
        """Record a patient's latest statistics (last write wins), unless they
        count fewer readings than the ones recorded: a patient's readings only
        accumulate, so such evidence is a stale copy (an earlier owner's,
        delivered late around a rebalance). Returns whether it was recorded."""
        return self.put_many([evidence]) == 1

    def put_many(self, items: Sequence[PatientEvidence]) -> int:
        """``put`` of each item in order, the arrays written once for all of
        them (an evidence message holds up to a thousand patients, and a
        conversion per item cost more than the rest of the agent's work on it).
        Returns how many were recorded."""
        ids = [evidence.patient_id for evidence in items]
        if len(set(ids)) != len(ids):  # one patient twice: in order, one at a time
            return sum(self.put_many([evidence]) for evidence in items)
        count = len(items)
        readings = np.fromiter(
            (e.count_exposed + e.count_unexposed for e in items), dtype=np.int64, count=count
        )
        rows = np.fromiter((self._rows.get(p, -1) for p in ids), dtype=np.int64, count=count)
        known = rows >= 0
        keep = ~known | (readings >= self._readings[np.where(known, rows, 0)])
        kept = np.flatnonzero(keep)
        if kept.size == 0:
            return 0
        for k in kept[~known[kept]]:  # new patients: the next rows
            row = len(self._rows)
            if row == self._gram.shape[0]:
                self._grow()
            self._rows[ids[k]] = rows[k] = row
        rows = rows[kept]
        chosen = [items[k] for k in kept]
        self._readings[rows] = readings[kept]
        self._gram[rows] = stacked([e.gram for e in chosen], self.model.stat_shape)
        self._recent[rows] = 0.0  # zeros: no recent-window statistics
        with_recent = [j for j, e in enumerate(chosen) if e.recent_gram is not None]
        if with_recent:
            self._recent[rows[with_recent]] = stacked(
                [chosen[j].recent_gram for j in with_recent], self.model.stat_shape
            )
        self._reference[rows] = [e.reference_time for e in chosen]
        self._cohort[rows] = [self._cohort_of(e.cohort) for e in chosen]
        if self.model.num_covariates:
            self._covariates[rows] = patient_design([e.covariates for e in chosen], self.model)
        for level, name in enumerate(self.model.grouping_levels):
            self._groups[rows, level] = [
                self._group_of(level, e.groups.get(name, MISSING_GROUP)) for e in chosen
            ]
        self.changes_since_fit += len(chosen)
        return len(chosen)

    def _cohort_of(self, cohort: str) -> int:
        index = self._cohort_index.get(cohort)
        if index is None:
            index = self._cohort_index[cohort] = len(self.cohorts)
            self.cohorts.append(cohort)
        return index

    def _group_of(self, level: int, label: str) -> int:
        index = self._group_index[level].get(label)
        if index is None:
            index = self._group_index[level][label] = len(self.group_labels[level])
            self.group_labels[level].append(label)
        return index

    def _grow(self) -> None:
        size = 2 * self._gram.shape[0]
        self._gram = np.concatenate([self._gram, np.zeros_like(self._gram)])
        self._recent = np.concatenate([self._recent, np.zeros_like(self._recent)])
        self._reference = np.concatenate([self._reference, np.full(size // 2, -np.inf)])
        self._cohort = np.concatenate([self._cohort, np.zeros(size // 2, dtype=np.int32)])
        self._readings = np.concatenate([self._readings, np.zeros_like(self._readings)])
        self._covariates = np.concatenate([self._covariates, np.zeros_like(self._covariates)])
        self._groups = np.concatenate([self._groups, np.zeros_like(self._groups)])

    def snapshot(self) -> tuple[PatientStats, np.ndarray, list[str]]:
        """A copy of the statistics at a common reference time (the latest event:
        with forgetting, everyone's evidence is weighted as of "now"), the cohort
        index of every patient, and the cohort labels."""
        n = self.num_patients
        stats = self._at_now(self._gram[:n], self.model)
        return stats, self._cohort[:n].copy(), list(self.cohorts)

    def covariates_snapshot(self) -> np.ndarray | None:
        """Every patient's covariate design row (natural units), rows as in
        ``snapshot``; None when the model has no covariates."""
        if not self.model.num_covariates:
            return None
        return self._covariates[: self.num_patients].copy()

    def groups_snapshot(self) -> GroupLabels | None:
        """Every patient's group at each further grouping level, rows as in
        ``snapshot``; None when the model has none."""
        if not self.model.grouping_levels:
            return None
        return GroupLabels(
            self._groups[: self.num_patients].copy(), [list(g) for g in self.group_labels]
        )

    def recent_snapshot(self) -> PatientStats | None:
        """The recent-window statistics (ModelConfig.recent_window) of every
        patient, rows as in ``snapshot``, at the same common reference time;
        None when the model has no recent window."""
        window = self.model.recent_window
        if window is None:
            return None
        return self._at_now(self._recent[: self.num_patients], window)

    def _at_now(self, gram: np.ndarray, model: ModelConfig) -> PatientStats:
        """A copy of ``gram`` (rows of the book) with every patient's weights
        re-based under ``model``'s forgetting to the latest event time of all."""
        reference = self._reference[: self.num_patients]
        stats = gram_stats(gram.copy(), reference.copy())
        finite = reference[np.isfinite(reference)]
        return decay_to(stats, float(finite.max()), model) if finite.size else stats


def published_levels(
    parts: LevelPosteriors, levels: tuple[str, ...], sizes: list[int]
) -> dict[str, list]:
    """The PopulationPosterior fields of the further grouping levels from the
    padded LevelPosteriors of every level (the cohorts first): each real group's
    moments (the further levels' groups one after the other) and the cross-level
    covariance blocks; ``sizes``: each level's real group count."""
    mean = np.concatenate(
        [np.asarray(m)[:, :size] for m, size in zip(parts.mean[1:], sizes[1:], strict=True)],
        axis=1,
    )
    var = np.concatenate(
        [np.asarray(v)[:, :size] for v, size in zip(parts.var[1:], sizes[1:], strict=True)],
        axis=1,
    )
    cross = [
        np.asarray(block)[:, : sizes[first], : sizes[second]].tolist()
        for block, (first, second) in zip(parts.cross, level_pairs(len(sizes)), strict=True)
    ]
    return {
        "group_levels": list(levels),
        "group_mean": mean.tolist(),
        "group_var": var.tolist(),
        "group_cross_cov": cross,
    }


def num_observations(stats: PatientStats, model: ModelConfig) -> float:
    """The weighted number of readings: Σ ω over every patient's Gram matrix
    (its (0, 0) entry), or a family measure's n_0 + n_1 (readings, or the
    Poisson exposure)."""
    if model.family == "gaussian":
        return float(stats.gram[:, 0, 0].sum())
    return float(stats.gram[:, 0].sum() + stats.gram[:, 2].sum())


def interval_of(described: dict[str, float]) -> Interval:
    """model.scores.describe's summary as the messages' Interval (q05-q95: 90%)."""
    return Interval(
        mean=described["mean"], sd=described["sd"], lower=described["q05"], upper=described["q95"]
    )


def _key(measure: str, version: int) -> jax.Array:
    """Draws are fixed by (measure, version): scores are reproducible."""
    return jax.random.fold_in(jax.random.PRNGKey(zlib.crc32(measure.encode())), version)


@dataclass
class FitResult:
    message: PopulationPosterior
    info: UpdateInfo  # of the last round
    seconds: float


def fit_until_converged(
    fitter: PopulationFitter,
    state: FitState,
    evidence: Evidence,
    key: jax.Array,
    max_rounds: int,
    progress: Callable[[int, int, float], None] | None = None,
) -> tuple[FitState, UpdateInfo, int]:
    """A warm update from ``state``, continued while it has not converged, at most
    ``max_rounds`` more (a warm update is bounded, but when much new evidence
    arrived at once q has further to go). Returns the state, the last update's
    info and the steps taken in all. ``progress``: PopulationFitter.update's,
    called after every chunk of steps (an exception it raises ends the fit)."""
    state, info = fitter.update(state, evidence, key, progress=progress)
    steps = info.steps
    for round_ in range(max_rounds):
        if info.converged:
            break
        state, info = fitter.update(
            state, evidence, jax.random.fold_in(key, round_ + 1), progress=progress
        )
        steps += info.steps
    return state, info, steps


class FitterPool:
    """One PopulationFitter per model *structure*, shared by every measure.

    The fit works on standardised Gram matrices, so the standardisation (which
    differs per measure) plays no part in it: measures with the same structure
    and priors share one fitter, hence one compilation per padded shape instead
    of one per measure. The initial variational state depends on the structure
    only, so it is built once per fitter.

    ``export_cache`` (model.exported) keeps the fitters' traced programs across
    processes: a restarted worker's first fit of a shape neither traces nor
    lowers the model (about half a minute a structure at 20k patients on two
    busy cores), and loads the compile from JAX's persistent cache.
    """

    def __init__(
        self, svi: SVIConfig | None = None, export_cache: ExportCache | None = None
    ) -> None:
        self.svi = svi or STREAMING_SVI
        self.export_cache = export_cache
        self._fitters: dict[ModelConfig, PopulationFitter] = {}
        self._initial: dict[int, FitState] = {}

    def fitter(
        self,
        model: ModelConfig,
        build: Callable[[Any, SVIConfig], PopulationFitter] | None = None,
    ) -> PopulationFitter:
        """The fitter of ``model``'s structure; ``build(structure, svi)`` makes
        another model's fitter (model.joint's) the first time."""
        structure = model.structure
        if structure not in self._fitters:
            if build is None:
                fitter = PopulationFitter(structure, self.svi, self.export_cache)
            else:
                fitter = build(structure, self.svi)
                fitter.export_cache = self.export_cache
            self._fitters[structure] = fitter
        return self._fitters[structure]

    def resume(self, fitter: PopulationFitter, initial: FitState, message: Any) -> FitState:
        """A warm start from a published posterior's q (``unconstrained_loc``,
        ``unconstrained_scale_tril``, ``svi_steps``, ``version``); ``initial``
        (a cold fit) when it belongs to another model structure."""
        try:
            return fitter.resume(
                initial,
                np.asarray(message.unconstrained_loc),
                np.asarray(message.unconstrained_scale_tril),
                total_steps=message.svi_steps,
                version=message.version,
            )
        except ValueError as error:
            log.info("cold fit of %s (%s)", message.event_id, error)
            return initial

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
        self.resume_from: PopulationPosterior | None = None

    def continue_from(self, message: PopulationPosterior) -> None:
        """Continue the sequence of ``message`` (the measure's last published
        posterior): its version numbering and, on the first fit, its q (a warm
        update from there instead of a cold fit; a cold fit when the published q
        belongs to another model structure)."""
        self.version = message.version
        if self.state is None:
            self.resume_from = message

    def _first_state(self, evidence: Evidence) -> FitState:
        initial = self.pool.initial_state(self.fitter, evidence)
        message, self.resume_from = self.resume_from, None
        if message is None:
            return initial
        return self.pool.resume(self.fitter, initial, message)

    def fit(
        self,
        stats: PatientStats,
        cohort: np.ndarray,
        cohorts: list[str],
        covariates: np.ndarray | None = None,
        groups: GroupLabels | None = None,
        progress: Callable[[int, int, float], None] | None = None,
    ) -> FitResult:
        """Continue SVI against all evidence (fresh on the first call) and build
        the next posterior message. ``covariates``: (P, q) design rows, natural
        units (PopulationBook.covariates_snapshot); ``groups``: the further
        grouping levels' groups (PopulationBook.groups_snapshot), needed when
        the model has them; ``progress`` as for fit_until_converged (a fit it
        ends leaves the model's state as it was). Blocking; run it off the event loop."""
        started = time.perf_counter()
        std_covariates = None
        if self.model.num_covariates:
            std_covariates = self.model.standardization.covariates(
                np.zeros((stats.num_patients, self.model.num_covariates))
                if covariates is None
                else covariates
            )
        levels = self.model.grouping_levels
        if levels and groups is None:
            raise ValueError(f"the model has grouping levels {levels}: pass their groups")
        evidence = pad_evidence(
            stats,
            cohort,
            max(len(cohorts), 1),
            std_covariates,
            groups.index if levels else None,
            tuple(max(len(labels), 1) for labels in groups.labels) if levels else (),
        )
        version = self.version + 1
        key = _key(self.measure, version)
        key_fit, key_draws, key_summary = jax.random.split(key, 3)
        state = self.state or self._first_state(evidence)
        state, info, steps = fit_until_converged(
            self.fitter, state, evidence, key_fit, self.max_rounds, progress
        )
        draws = self.fitter.draws(state, key_draws)
        g = len(cohorts)
        published_groups = {}
        if self.model.family != "gaussian":
            if levels:
                raise ValueError(f"a {self.model.family} measure has no further grouping levels")
            cohort_mean, cohort_var = family_cohort_posteriors(
                draws,
                evidence.gram,
                evidence.cohort,
                evidence.num_cohorts,
                self.model.structure,
                evidence.covariates,
            )
        elif levels:
            parts = level_posteriors(
                draws,
                evidence.gram,
                evidence.cohort,
                evidence.num_cohorts,
                self.model.structure,
                evidence.covariates,
                evidence.groups,
                evidence.num_groups,
            )
            cohort_mean, cohort_var = parts.mean[0], parts.var[0]
            published_groups = published_levels(parts, levels, [g, *map(len, groups.labels)])
            published_groups["groups"] = groups.labels
        else:
            cohort_mean, cohort_var = cohort_posteriors(
                draws,
                evidence.gram,
                evidence.cohort,
                evidence.num_cohorts,
                self.model.structure,
                evidence.covariates,
            )
        quantities = population_quantities(
            self.fitter.draws(state, key_summary, SUMMARY_DRAWS), self.model
        )
        coefficients = [
            Coefficient(
                covariate=row["covariate"],
                effect=interval_of(row["effect"]),
                intercept=interval_of(row["intercept"]),
            )
            for row in coefficient_summaries(quantities, self.model)["coefficients"]
        ]
        curves = curve_summaries(quantities, self.model, quantities["effect"])
        summary = {}
        for k, level in enumerate(levels):
            summary[f"effect_sd_{level}"] = interval_of(
                describe(quantities["effect_sd_groups"][:, k])
            )
        for name, values in quantities.items():
            if name in ("coefficients", "time_coefficients", "effect_sd_groups"):
                continue
            described = describe(values)
            if described is not None:
                summary[name] = interval_of(described)
        transform = self.fitter.guide.get_transform(self.fitter.params(state))
        std = self.model.standardization
        message = PopulationPosterior(
            event_id=f"posterior:{self.measure}:{version}",
            event_time=datetime.now(UTC),
            measure=self.measure,
            version=version,
            num_patients=stats.num_patients,
            num_observations=num_observations(stats, self.model),
            elbo=info.elbo,
            svi_steps=steps,
            converged=info.converged,
            standardization=std.model_dump(),
            draws={
                f: np.asarray(getattr(draws, f)).tolist()
                for f in (*DRAW_FIELDS, *OPTIONAL_DRAW_FIELDS)
                if getattr(draws, f) is not None
            },
            cohorts=cohorts,
            cohort_mean=np.asarray(cohort_mean)[:, :g].tolist(),
            cohort_var=np.asarray(cohort_var)[:, :g].tolist(),
            **published_groups,
            summary=summary,
            coefficients=coefficients,
            curves=curves.get("curves", []),
            daily_cycle=curves.get("daily_cycle"),
            unconstrained_loc=np.asarray(transform.loc).tolist(),
            unconstrained_scale_tril=np.asarray(transform.scale_tril).tolist(),
        )
        self.state, self.version = state, version
        return FitResult(message, info, time.perf_counter() - started)


#: The cohort attribute of streamed evidence: the enrolment's ``cohort`` label
#: (the only one the evidence carries), so the cohort structure is ``partial+cohort``.
COHORT_ATTRIBUTE = "cohort"


def structure_name(model: ModelConfig) -> str:
    """A model's structure under the selection's names (complete, none, partial,
    partial+cohort, partial+cohort+<level>...)."""
    if not model.cohort_level:
        return model.effect_pooling
    return "+".join([model.effect_pooling, COHORT_ATTRIBUTE, *model.grouping_levels])


class StructureSelectionRun:
    """One structure selection of one measure (model.selection) on a snapshot of
    its book: complete, none and partial pooling, and partial pooling with a
    cohort level when the patients come from at least two cohorts, compared by
    K-fold cross-validation over patients. With further grouping levels
    (``groups``: PopulationBook.groups_snapshot) every level with at least two
    groups is an attribute as the cohort is: partial pooling with each one as
    the level, and with each combination of them (model.selection.
    candidate_structures), so the selection says which levels earn their place.

    ``step()`` runs the next SVI fit (one fold of one structure; blocking), so the
    agent can let population updates in between; ``run()`` runs them all. The
    fits see standardised statistics only, so ``fitters`` (compiled fitters) can
    be shared by every measure.
    """

    def __init__(
        self,
        measure: str,
        model: ModelConfig,
        snapshot: tuple[PatientStats, np.ndarray, list[str]],
        *,
        num_folds: int = 5,
        seed: int = 0,
        svi: SVIConfig = SELECTION_SVI,
        fitters: FitterCache | None = None,
        posterior_version: int = 0,
        evidence_digest: str = "",
        covariates: np.ndarray | None = None,
        groups: GroupLabels | None = None,
    ) -> None:
        stats, cohort, _labels = snapshot
        self.measure = measure
        self.model = model
        self.stats = stats
        self.cohort = np.asarray(cohort)
        self.num_cohorts = int(np.unique(self.cohort).size)
        indices = {COHORT_ATTRIBUTE: self.cohort}
        if groups is not None:
            indices.update(
                (level, np.asarray(groups.index[:, k]))
                for k, level in enumerate(model.grouping_levels)
            )
        # A level is not identified with a single group (as select_structure).
        self.attributes = {
            name: index for name, index in indices.items() if np.unique(index).size >= 2
        }
        attributes = list(self.attributes)
        self.skipped = [name for name in indices if name not in self.attributes]
        # With patient covariates (``covariates``: PopulationBook.covariates_snapshot)
        # each covariate's block is compared with and without it as well.
        self.covariates = None
        if model.num_covariates and covariates is not None:
            self.covariates = model.standardization.covariates(covariates)
        blocks = column_blocks(model.covariates) if self.covariates is not None else {}
        self.structures = candidate_structures(model, attributes, blocks)
        self.seed = seed
        self.svi = svi
        self.fitters = fitters
        self.folds = patient_folds(stats.num_patients, num_folds, seed)
        self.posterior_version = posterior_version
        self.evidence_digest = evidence_digest
        self.pointwise = {s.name: np.full(stats.num_patients, np.nan) for s in self.structures}
        self.seconds = 0.0  # compute time of the steps run so far
        self._steps = self._fits()

    @property
    def num_folds(self) -> int:
        return int(self.folds.max()) + 1

    def _fits(self) -> Iterator[None]:
        for structure in self.structures:
            cohort = self.attributes.get(structure.cohort_attribute)
            groups = None
            if structure.group_attributes:
                groups = np.stack([self.attributes[a] for a in structure.group_attributes], -1)
            for _fold, test, elpd, _info in cross_validate_folds(
                structure,
                self.stats,
                cohort,
                self.folds,
                seed=self.seed,
                svi_config=self.svi,
                fitters=self.fitters,
                groups=groups,
                covariates=self.covariates,
            ):
                self.pointwise[structure.name][test] = elpd
                yield

    def step(self) -> bool:
        """Run the next fit (blocking; off the event loop). False once all have run."""
        started = time.perf_counter()
        try:
            next(self._steps)
        except StopIteration:
            return False
        finally:
            self.seconds += time.perf_counter() - started
        return True

    def run(self) -> StructureSelection:
        while self.step():
            pass
        return self.message()

    def message(self) -> StructureSelection:
        """The published record; every step must have run."""
        if any(np.isnan(values).any() for values in self.pointwise.values()):
            raise RuntimeError("the structure selection has not run every fold")
        table = compare(self.pointwise)
        return StructureSelection(
            event_id=f"selection:{self.measure}:v{self.posterior_version}:"
            f"{self.evidence_digest[:16]}",
            event_time=datetime.now(UTC),
            measure=self.measure,
            current_structure=structure_name(self.model),
            choice=choose(self.pointwise),
            best=table[0]["structure"],
            structures=[StructureScore(**row) for row in table],
            num_patients=self.stats.num_patients,
            num_cohorts=self.num_cohorts,
            num_folds=self.num_folds,
            seed=self.seed,
            svi_steps=self.svi.fresh_steps,
            skipped_attributes=self.skipped,
            posterior_version=self.posterior_version,
            evidence_digest=self.evidence_digest,
            seconds=self.seconds,
        )
