"""From a patient's statistics and the current population posterior to the
published EfficacyScore (pure: arrays and messages in, messages out).

A population posterior message (streams.schemas.PopulationPosterior) carries
fixed draws θ_s of the hyperparameters and, under each draw, the posterior of
every cohort's effect deviation computed from all patients. A patient's score is
the exact Gaussian mixture over those draws (model.scores), so it is a
deterministic function of the patient's evidence and the posterior version.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from types import MappingProxyType
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np
from pydantic_core import to_json

from model.config import DecisionRule, ModelConfig, default_scale
from model.covariates import patient_design, reading_design
from model.evidence import decay_to, empty_packed, gram_stats, stacked
from model.family_scores import summarize_family_given_shifts
from model.likelihood import Hyper
from model.population import SMALL_BUCKET, bucket_size
from model.predictive import RESIDUAL_BLOCK, dispatch_residuals
from model.scores import (
    EffectSummary,
    LevelPosteriors,
    classify,
    dispatch_given_cohorts,
    level_pairs,
    shift_moments_by_level,
)
from model.subgroups import SubgroupSummary
from streams.catalogue import MeasureSpec
from streams.patient_state import MeasureStats, PatientRecord, Published, days
from streams.schemas import (
    MISSING_GROUP,
    SCHEMA_VERSION,
    Interval,
    JointScore,
    MeasureScore,
    Observation,
    PopulationPosterior,
    bounded_event_id,
    trusted,
)

LEVEL = 0.9
SCORING_BLOCK = 256  # patients per compiled scoring call (model.scores blocks)
Z_LEVEL = 1.6448536269514722  # Φ⁻¹(0.95): the composite's 90% interval
DRAW_FIELDS = ("mu", "tau", "corr_chol", "tau_cohort", "sigma", "gamma")
#: Published only by models with patient covariates (ModelConfig.covariates).
COVARIATE_DRAW_FIELD = "coef"
#: Published only by models with further grouping levels (ModelConfig.grouping_levels).
GROUPS_DRAW_FIELD = "tau_groups"
OPTIONAL_DRAW_FIELDS = (COVARIATE_DRAW_FIELD, GROUPS_DRAW_FIELD)


@dataclass(frozen=True)
class MeasurePosterior:
    """A published population posterior as arrays, ready to score patients.

    ``levels`` are the further grouping levels (the cohorts come first and are
    not among them); ``group_index`` maps each level's group labels, the cohorts'
    first, to their columns in ``groups`` (model.scores.LevelPosteriors: every
    level's groups' moments and the covariances between levels, per draw)."""

    measure: str
    version: int
    draws: Hyper
    cohort_index: dict[str, int]
    cohort_mean: np.ndarray  # (S, G)
    cohort_var: np.ndarray  # (S, G)
    levels: tuple[str, ...] = ()
    group_index: tuple[dict[str, int], ...] = ()
    groups: LevelPosteriors | None = None

    @classmethod
    def from_message(cls, message: PopulationPosterior) -> MeasurePosterior:
        draws = Hyper(*(jnp.asarray(np.asarray(message.draws[f])) for f in DRAW_FIELDS))
        for name in OPTIONAL_DRAW_FIELDS:
            if name in message.draws:
                draws = draws._replace(**{name: jnp.asarray(np.asarray(message.draws[name]))})
        num_draws = draws.mu.shape[0]
        cohort_mean = np.asarray(message.cohort_mean, dtype=float).reshape(num_draws, -1)
        cohort_var = np.asarray(message.cohort_var, dtype=float).reshape(num_draws, -1)
        cohort_index = {c: g for g, c in enumerate(message.cohorts)}
        if not message.group_levels:
            return cls(message.measure, message.version, draws, cohort_index, cohort_mean,
                       cohort_var)  # fmt: skip
        sizes = [len(cohort_index), *(len(labels) for labels in message.groups)]
        starts = np.cumsum([0, *sizes[1:]])
        further_mean = np.asarray(message.group_mean, dtype=float).reshape(num_draws, -1)
        further_var = np.asarray(message.group_var, dtype=float).reshape(num_draws, -1)
        blocks = [
            slice(start, start + size) for start, size in zip(starts[:-1], sizes[1:], strict=True)
        ]
        groups = LevelPosteriors(
            mean=(cohort_mean, *(further_mean[:, block] for block in blocks)),
            var=(cohort_var, *(further_var[:, block] for block in blocks)),
            cross=tuple(
                np.asarray(block, dtype=float).reshape(num_draws, sizes[first], sizes[second])
                for block, (first, second) in zip(
                    message.group_cross_cov, level_pairs(len(sizes)), strict=True
                )
            ),
        )
        return cls(
            measure=message.measure,
            version=message.version,
            draws=draws,
            cohort_index=cohort_index,
            cohort_mean=cohort_mean,
            cohort_var=cohort_var,
            levels=tuple(message.group_levels),
            group_index=(
                cohort_index,
                *({label: g for g, label in enumerate(labels)} for labels in message.groups),
            ),
            groups=groups,
        )

    def cohort_posterior(
        self, cohorts: list[str | None], groups: list[dict[str, str]] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(S, P) mean and variance of each patient's total group deviation under
        each draw: its cohort's deviation, plus, with further grouping levels,
        its group's at each level (``groups``: each patient's level -> group,
        PatientRecord.groups; a level missing there is the group MISSING_GROUP).
        A group the population fit has not seen gets its prior N(0, τ_l²),
        independent of every other (model.scores.shift_moments_by_level)."""
        num_draws = self.cohort_mean.shape[0]
        labels = [list(cohorts)]
        for level in self.levels:
            labels.append(
                [MISSING_GROUP if g is None else g.get(level, MISSING_GROUP)
                 for g in (groups or [None] * len(cohorts))]
            )  # fmt: skip
        index = np.asarray(
            [
                [-1 if label is None else at.get(label, -1) for label in column]
                for column, at in zip(labels, self.group_index or (self.cohort_index,), strict=True)
            ],
            dtype=np.int64,
        ).reshape(len(labels), len(cohorts))
        prior_var = np.asarray(self.draws.tau_cohort, dtype=float).reshape(num_draws, 1) ** 2
        if self.levels:
            level_sds = np.asarray(self.draws.tau_groups, dtype=float).reshape(num_draws, -1)
            prior_var = np.concatenate([prior_var, level_sds**2], axis=1)
        parts = self.groups or LevelPosteriors((self.cohort_mean,), (self.cohort_var,), ())
        return shift_moments_by_level(parts, index.T, prior_var)

    def shift_table(
        self, cohorts: list[str | None], groups: list[dict[str, str]] | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """cohort_posterior as a table: (S, K) means and variances and each
        patient's column (P,), for model.scores.summarize_given_cohorts. Without
        further grouping levels the columns are the cohorts' and one for a
        cohort the fit has not seen (its prior N(0, τ_u²)), so only the
        patients' indices vary with the batch; with levels, each patient's own."""
        if self.levels:
            mean, var = self.cohort_posterior(cohorts, groups)
            return mean, var, np.arange(len(cohorts))
        num_draws = self.cohort_mean.shape[0]
        unseen = self.cohort_mean.shape[1]
        at = self.cohort_index
        index = np.asarray([unseen if c is None else at.get(c, unseen) for c in cohorts], np.int32)
        prior_var = np.asarray(self.draws.tau_cohort, dtype=float).reshape(num_draws, 1) ** 2
        mean = np.concatenate([self.cohort_mean, np.zeros((num_draws, 1))], axis=1)
        return mean, np.concatenate([self.cohort_var, prior_var], axis=1), index


def standardized_covariates(rows: list[list[float]], model: ModelConfig) -> np.ndarray | None:
    """Patients' covariate design rows (natural units) as the model's
    standardised (P, q) array; None when the model has no covariates. A row of
    the wrong width (a patient enrolled under another covariate catalogue) is
    taken at the centre, standardised zeros (model.covariates.patient_design)."""
    design = patient_design(rows, model)
    return None if design is None else model.standardization.covariates(design)


def summarize_patients(*args, **kwargs) -> EffectSummary:
    """``dispatch_patients(...)()``: the summaries, waited for."""
    return dispatch_patients(*args, **kwargs)()


def dispatch_patients(
    posterior: MeasurePosterior,
    stats: list[MeasureStats],
    cohorts: list[str | None],
    covariates: list[list[float]],
    spec: MeasureSpec,
    model: ModelConfig,
    groups: list[dict[str, str]] | None = None,
) -> Callable[[], EffectSummary]:
    """Mixture summaries of a batch of patients for one measure (raw units),
    as dispatched to the device: the returned function waits for them
    (model.scores.dispatch_given_cohorts; a Bernoulli or Poisson measure's are
    computed at once). ``covariates``: each patient's design row
    (PatientRecord.covariates); ``groups``: each patient's groups
    (PatientRecord.groups), for a posterior with further grouping levels."""
    gram = stacked([s.gram for s in stats], model.stat_shape)
    if model.family != "gaussian":
        cohort_mean, cohort_var = posterior.cohort_posterior(cohorts, groups)
        summary = _summarize_family(
            posterior, gram, cohort_mean, cohort_var, covariates, spec, model
        )
        return lambda: summary
    shift_mean, shift_var, shift_index = posterior.shift_table(cohorts, groups)
    return dispatch_given_cohorts(
        posterior.draws,
        gram,
        shift_mean,
        shift_var,
        spec.measure_config(),
        model,
        shift_index=shift_index,
        level=LEVEL,
        block=SCORING_BLOCK,
        covariates=standardized_covariates(covariates, model),
    )


def _summarize_family(
    posterior: MeasurePosterior,
    cells: np.ndarray,
    cohort_mean: np.ndarray,
    cohort_var: np.ndarray,
    covariates: list[list[float]],
    spec: MeasureSpec,
    model: ModelConfig,
) -> EffectSummary:
    """summarize_patients of a Bernoulli or Poisson measure: its cells and the
    cohort posteriors through model.family_scores.summarize_family_given_shifts,
    padded to a bucket size (model.population.bucket_size: one compile per
    size; padding rows have no readings and are dropped). The Monte Carlo draws
    of a difference scale use a fixed seed: a score is a deterministic function
    of the evidence and the posterior version."""
    count = cells.shape[0]
    size = bucket_size(count, SMALL_BUCKET)
    pad = size - count
    std_covariates = standardized_covariates(covariates, model)
    if pad:
        cells = np.concatenate([cells, np.zeros((pad, cells.shape[1]))])
        cohort_mean = np.pad(cohort_mean, ((0, 0), (0, pad)))
        cohort_var = np.pad(cohort_var, ((0, 0), (0, pad)), constant_values=1.0)
        if std_covariates is not None:
            std_covariates = np.concatenate(
                [std_covariates, np.zeros((pad, std_covariates.shape[1]))]
            )
    summary = summarize_family_given_shifts(
        posterior.draws,
        cells,
        cohort_mean,
        cohort_var,
        spec.measure_config(),
        model,
        level=LEVEL,
        covariates=std_covariates,
    )
    return EffectSummary(*(np.asarray(field)[:count] for field in summary))


def compile_scoring(
    posterior: MeasurePosterior, spec: MeasureSpec, model: ModelConfig, max_readings: int
) -> int:
    """Compile every padded shape that scoring and the predictive residuals use
    for batches of up to ``max_readings`` readings, by running both on empty
    evidence. Blocking (about a second per shape on two cores): run it off the
    event loop. Otherwise each new batch size compiles on the patients agent's
    first batch of that size and holds up the stream meanwhile. Returns the
    number of shapes run."""
    empty = MeasureStats(gram=empty_packed(model), reference_time=0.0)
    cohort = next(iter(posterior.cohort_index), None)
    runs = 0
    for size in _bucket_sizes(SCORING_BLOCK):
        summarize_patients(posterior, [empty] * size, [cohort] * size, [[]] * size, spec, model)
        runs += 1
    if model.family != "gaussian":  # no predictive check (patient_step._pending)
        return runs
    reading = PendingReading(None, float("-inf"), cohort, 0.0, 0.0, 0.0, "")
    for size in _bucket_sizes(bucket_size(min(max_readings, RESIDUAL_BLOCK), SMALL_BUCKET)):
        reading_residuals(posterior, [reading] * size, model)
        runs += 1
    return runs


def _bucket_sizes(largest: int) -> list[int]:
    """The padded batch sizes up to ``largest`` (model.population.bucket_size)."""
    return [SMALL_BUCKET << k for k in range(64) if SMALL_BUCKET << k <= largest]


def interval_at(summary: EffectSummary | SubgroupSummary, index: int) -> Interval:
    """Item ``index`` of a mixture summary (a patient's or a subgroup's) as an Interval."""
    return Interval(
        mean=float(summary.mean[index]),
        sd=float(summary.sd[index]),
        lower=float(summary.lower[index]),
        upper=float(summary.upper[index]),
    )


class ScoreRow(NamedTuple):
    """One patient's score of one measure: MeasureScore's fields in its order,
    the effect's interval flattened (``mean`` … ``upper``). What the step
    compares, records and publishes: a named tuple, where the models
    (MeasureScore and its Interval) and their serialisation cost more per
    patient than the mixture summaries. ``model()`` is the MeasureScore,
    ``json()`` its serialisation."""

    measure: str
    unit: str
    direction: str
    mcid: float
    mean: float
    sd: float
    lower: float
    upper: float
    level: float
    p_benefit_ge_mcid: float
    p_benefit_gt_0: float
    classification: str
    recommended_action: str | None
    population_effect: float
    cohort_deviation: float | None
    individual_deviation: float | None
    effect_scale: str | None
    shrinkage: float
    count_exposed: int
    count_unexposed: int
    last_event_time: datetime | None
    population_version: int

    @classmethod
    def of(cls, score: MeasureScore) -> ScoreRow:
        values = score.model_dump()
        effect = values.pop("effect")
        return cls(**values, **effect)

    def model(self) -> MeasureScore:
        """The MeasureScore of these values (no validation: computed with their types)."""
        values = self._asdict()
        effect = {name: values.pop(name) for name in INTERVAL_FIELDS}
        return trusted(MeasureScore, **(values | {"effect": trusted(Interval, **effect)}))

    def json(self) -> bytes:
        """``json_bytes(self.model())``, the same bytes, without the models:
        the numbers and the time formatted by pydantic's serialiser in one call,
        between the field names in MeasureScore's order
        (tests/test_score_rows.py checks it against the model's serialisation)."""
        numbers = to_json(
            [
                self.mcid, self.mean, self.sd, self.lower, self.upper, self.level,
                self.p_benefit_ge_mcid, self.p_benefit_gt_0, self.population_effect,
                self.cohort_deviation, self.individual_deviation, self.shrinkage,
                self.count_exposed, self.count_unexposed, self.last_event_time,
                self.population_version,
            ],
            inf_nan_mode="null",  # MeasureScore's (pydantic's default)
        )[1:-1].split(b",")  # no number or time has a comma  # fmt: skip
        values = (
            *numbers[:8],
            _json_text(self.classification),
            _json_text(self.recommended_action),
            *numbers[8:11],
            _json_text(self.effect_scale),
            *numbers[11:],
        )
        keys = _score_keys(self.measure, self.unit, self.direction)
        parts = [b""] * (len(keys) + len(values))  # key, value, …, key: the closing brace
        parts[::2] = keys
        parts[1::2] = values
        return b"".join(parts)


INTERVAL_FIELDS = ("mean", "sd", "lower", "upper")


@functools.lru_cache(maxsize=256)
def _score_keys(measure: str, unit: str, direction: str) -> tuple[bytes, ...]:
    """What ScoreRow.json writes before each of its values, in MeasureScore's
    order: the measure's own fields (the same for all its patients) with the
    next field name, then each field name, then the closing brace. (The MCID
    is formatted with the numbers: a cache would take -0.0 for 0.0.)"""
    head = to_json({"measure": measure, "unit": unit, "direction": direction})
    return (
        head[:-1] + b',"mcid":', b',"effect":{"mean":', b',"sd":', b',"lower":', b',"upper":',
        b'},"level":', b',"p_benefit_ge_mcid":', b',"p_benefit_gt_0":',
        b',"classification":', b',"recommended_action":', b',"population_effect":',
        b',"cohort_deviation":', b',"individual_deviation":', b',"effect_scale":',
        b',"shrinkage":', b',"count_exposed":', b',"count_unexposed":',
        b',"last_event_time":', b',"population_version":', b"}",
    )  # fmt: skip


@functools.lru_cache(maxsize=256)
def _json_text(value: str | None) -> bytes:
    """A string (a call, an action, a scale: a few distinct values) as JSON."""
    return to_json(value)


def measure_scores(*args, **kwargs) -> list[MeasureScore]:
    """``measure_score_rows`` as MeasureScore models."""
    return [row.model() for row in measure_score_rows(*args, **kwargs)]


def measure_score_rows(
    posterior: MeasurePosterior,
    stats: list[MeasureStats],
    cohorts: list[str | None],
    covariates: list[list[float]],
    spec: MeasureSpec,
    model: ModelConfig,
    rule: DecisionRule,
    pathways: dict[str, str] | None = None,
    previous: list[str | None] | None = None,
    groups: list[dict[str, str]] | None = None,
    summary: EffectSummary | None = None,
) -> list[ScoreRow]:
    """Scores of a batch of patients for one measure, with the decision rule
    (with hysteresis against each patient's ``previous`` published call) and the
    recommended action of each call from ``pathways`` (Settings.pathways);
    ``groups`` as for summarize_patients. ``summary``: the patients'
    summarize_patients, when already computed."""
    pathways = pathways or {}
    scale = None
    if model.family != "gaussian":
        scale = spec.effect_scale or default_scale(model.family)
    if summary is None:
        summary = summarize_patients(posterior, stats, cohorts, covariates, spec, model, groups)
    counts_exposed = np.asarray([s.count_exposed for s in stats])
    counts_unexposed = np.asarray([s.count_unexposed for s in stats])
    calls = classify(
        summary.p_benefit_ge_mcid,
        summary.p_benefit_gt_0,
        counts_exposed,
        counts_unexposed,
        rule,
        previous=None if previous is None else np.asarray(previous, dtype=object),
    )
    # Python floats of every summary at once (a NaN deviation is null).
    columns = zip(
        *(
            np.asarray(column, dtype=float).tolist()
            for column in (
                summary.mean, summary.sd, summary.lower, summary.upper,
                summary.p_benefit_ge_mcid, summary.p_benefit_gt_0, summary.population_effect,
                summary.cohort_deviation, summary.individual_deviation, summary.shrinkage,
            )
        ),
        strict=True,
    )  # fmt: skip
    name, unit, direction, mcid, version = (
        spec.name, spec.unit, spec.direction, spec.mcid, posterior.version,
    )  # fmt: skip
    rows = []
    for s, call, row in zip(stats, calls.tolist(), columns, strict=True):
        mean, sd, lower, upper, p_mcid, p_any, population, cohort, individual, shrink = row
        call = str(call)
        cohort = None if math.isnan(cohort) else cohort
        individual = None if math.isnan(individual) else individual
        score = ScoreRow(name, unit, direction, mcid, mean, sd, lower, upper, LEVEL, p_mcid,
                         p_any, call, pathways.get(call), population, cohort, individual, scale,
                         shrink, s.count_exposed, s.count_unexposed, s.last_event_time,
                         version)  # fmt: skip
        rows.append(score)
    return rows


class PendingReading(NamedTuple):
    """A reading about to be applied, with its patient's evidence before it.
    (A named tuple: one is built for every reading, and a frozen dataclass
    cost ten times as much to build.) ``gram``, ``covariates`` and ``groups``
    are the record's own objects, which apply_event replaces and never
    modifies."""

    gram: bytes | None  # packed (PatientRecord's); None: the patient's first reading of the measure
    reference_time: float
    cohort: str | None
    exposure: float
    time: float  # days
    value: float
    origin: str  # "topic:partition:offset" of the raw record
    covariates: Sequence[float] = ()  # the patient's design row (PatientRecord.covariates)
    time_covariates: Sequence[float] = ()  # the reading's (Observation.time_covariates)
    groups: Mapping[str, str] = MappingProxyType({})  # the patient's (PatientRecord.groups)


def pending_reading(
    record: PatientRecord, observation: Observation, origin: str
) -> PendingReading | None:
    """Capture the patient's evidence of the observation's measure just before
    it. None for a late reading (older than the patient's latest of the
    measure): its predictive would be conditioned on later evidence."""
    stats = record.measures.get(observation.measure)
    time = days(observation.event_time)
    if stats is not None and time < stats.reference_time:
        return None
    return PendingReading(
        gram=None if stats is None else stats.gram,
        reference_time=float("-inf") if stats is None else stats.reference_time,
        cohort=record.cohort,
        exposure=record.exposure_at(time) * observation.adherence,
        time=time,
        value=observation.value,
        origin=origin,
        covariates=record.covariates,
        time_covariates=observation.time_covariates,
        groups=record.groups,
    )


def reading_residuals(
    posterior: MeasurePosterior, readings: list[PendingReading], model: ModelConfig
) -> np.ndarray:
    """``dispatch_reading_residuals(...)()``: the residuals, waited for."""
    return dispatch_reading_residuals(posterior, readings, model)()


def dispatch_reading_residuals(
    posterior: MeasurePosterior, readings: list[PendingReading], model: ModelConfig
) -> Callable[[], np.ndarray]:
    """Standardised posterior-predictive residual of each reading given its
    patient's evidence before it (model.predictive), evidence weighted as of the
    reading's time: N(0, 1) while the population posterior describes the data.
    As dispatched to the device: the returned function waits for them."""
    empty = empty_packed(model)
    gram = stacked([empty if r.gram is None else r.gram for r in readings], model.stat_shape)
    times = np.asarray([r.time for r in readings])
    before = decay_to(gram_stats(gram, [r.reference_time for r in readings]), times, model)
    shift_mean, shift_var, columns = posterior.shift_table(
        [r.cohort for r in readings], [r.groups for r in readings]
    )
    return dispatch_residuals(
        posterior.draws,
        before.gram,
        shift_mean,
        shift_var,
        np.asarray([r.exposure for r in readings]),
        times,
        np.asarray([r.value for r in readings]),
        model,
        standardized_covariates([list(r.covariates) for r in readings], model),
        reading_design([r.time_covariates for r in readings], model),
        columns=columns,
    )


def composite(scores: Sequence[ScoreRow], weights: dict[str, float]) -> dict | None:
    """The CompositeScore of ``scores`` as its JSON fields (the score message's
    ``composite``: efficacy_score_json writes them without building the model).
    Weighted mean of the benefit in MCID units over Gaussian measures with
    enough data (binary and count measures' effect scales are left out):
    z_m = sign_m b_m / MCID_m, mean Σ w z / Σ w, sd √(Σ w² sd_z²) / Σ w (measures
    treated as independent), 90% interval mean ± 1.645 sd."""
    measures = []
    total = mean = var = 0.0
    for s in scores:
        weight = weights.get(s.measure, 0)
        if s.classification == "insufficient_data" or s.mcid <= 0 or weight <= 0:
            continue
        if s.effect_scale is not None:  # a ratio or difference of a family measure is not in units
            continue
        measures.append(s.measure)
        total += weight
        mean += weight * (s.mean if s.direction == "higher" else -s.mean) / s.mcid
        var += (weight * s.sd / s.mcid) ** 2
    if not measures:
        return None
    mean, sd = mean / total, math.sqrt(var) / total
    return {
        "benefit_in_mcid": {
            "mean": mean,
            "sd": sd,
            "lower": mean - Z_LEVEL * sd,
            "upper": mean + Z_LEVEL * sd,
        },
        "measures": measures,
    }


def changed_materially(previous: Published | None, score: ScoreRow) -> bool:
    """Publish when there is no earlier score, the call changed, or the effect
    moved by ≥ 0.1 posterior sd, its sd by ≥ 5%, or P(benefit ≥ MCID) by ≥ 0.02.
    (A new population version alone does not count: when the population
    posterior moves materially, every score is republished regardless.)"""
    if previous is None:
        return True
    sd = max(score.sd, 1e-12)
    return (
        previous.classification != score.classification
        or abs(score.mean - previous.mean) >= 0.1 * sd
        or abs(score.sd - previous.sd) >= 0.05 * sd
        or abs(score.p_benefit_ge_mcid - previous.p_benefit_ge_mcid) >= 0.02
    )


def published_of(score: ScoreRow) -> Published:
    return trusted(
        Published,
        population_version=score.population_version,
        mean=score.mean,
        sd=score.sd,
        p_benefit_ge_mcid=score.p_benefit_ge_mcid,
        classification=score.classification,
    )


def efficacy_score_json(
    record: PatientRecord,
    scores: Sequence[ScoreRow],
    weights: dict[str, float],
    rule: DecisionRule,
    joint: Sequence[JointScore] = (),
) -> bytes:
    """The message of a patient's score over every measure scored so far (and
    its ``joint`` group scores), as the JSON sent: ``EfficacyScore`` (the score
    topic's schema) serialised, without building the model. Its event id is a
    function of the evidence and posterior versions it rests on, so a
    re-published identical score has the same id.

    The fields are written in the model's order by pydantic's own serialiser
    (``pydantic_core.to_json``: the same float, time and string formatting),
    each measure's score by ScoreRow.json, so the bytes are those of
    ``EfficacyScore(...).model_dump_json()`` of the same values
    (tests/test_patient_step.py checks every score of a programme), in a
    fraction of the time: building the envelope model and its composite was
    most of a score's Python."""
    scores = sorted(scores, key=lambda s: s.measure)
    joint = sorted(joint, key=lambda s: s.group)
    basis = ";".join(
        [
            *(
                f"{s.measure}@{s.population_version}/{s.count_exposed + s.count_unexposed}"
                for s in scores
            ),
            *(f"joint:{s.group}@{s.population_version}" for s in joint),
        ]
    )
    last_times = [s.last_event_time for s in scores if s.last_event_time is not None]
    # Every field of EfficacyScore, in its order (the measures' scores between
    # the fields before and after them); the values come from validated records
    # and scores, with their field's type.
    before = to_json(
        {
            "schema_version": SCHEMA_VERSION,
            "event_id": bounded_event_id("score", f"{record.patient_id}:{basis}"),
            "event_time": max(last_times) if last_times else datetime.now(UTC),
            "patient_id": record.patient_id,
            "cohort": record.cohort or "",
            "score_version": sum(
                s.population_version + s.count_exposed + s.count_unexposed for s in scores
            ),
            "decision_rule_version": rule.version,
        },
    )
    after = to_json(
        {"composite": composite(scores, weights), "joint": joint},
        inf_nan_mode="null",  # EfficacyScore's (pydantic's default)
    )
    measures = b",".join([s.json() for s in scores])
    return b"".join((before[:-1], b',"measures":[', measures, b"],", after[1:]))
