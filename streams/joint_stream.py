"""Joint groups in the stream (catalogue ``[joint.<group>]``, model.joint): the
group's model, its evidence gathered from the measures' population books, the
warm-started fit that turns it into a versioned JointPosterior, and a patient's
joint score under it (pure: no Kafka).

The joint model is fitted on the same standardised Gram matrices the measures'
own fits see (each measure's streaming standardisation), stacked per patient
(P, M, d, d); a patient without readings of a measure has a zero block there,
which adds exactly nothing (model.joint). With the measures' cohort level the
group's model has one too (u_g shifts every measure's effect of cohort g's
patients; the patients' cohorts from the measures' books), and the posterior
carries each draw's posterior of every cohort's u_g from all the evidence. A
patient's joint score mixes the patient's block posterior over the posterior's
draws of θ and its cohort's u_g (model.joint.joint_patients) and reports each
effect in its measure's unit.
"""

from __future__ import annotations

import hashlib
import time
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from datetime import UTC, datetime
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from model.config import DecisionRule, ModelConfig, Standardization
from model.evidence import stacked
from model.joint import (
    JointConfig,
    JointHyper,
    JointPatients,
    cohort_posteriors,
    describe_common_factor,
    describe_correlation,
    joint_fitter,
    joint_patients,
    pad_joint,
)
from model.population import MIN_PATIENT_BUCKET, FitState, PopulationFitter, UpdateInfo, bucket_size
from model.scores import classify, describe
from streams.catalogue import Catalogue, CatalogueError, JointGroupSpec, MeasureSpec
from streams.partitioning import posterior_key
from streams.patient_state import PatientRecord, PublishedJoint
from streams.population_book import FitterPool, PopulationBook, fit_until_converged, interval_of
from streams.schemas import Interval, JointEffect, JointPosterior, JointScore, json_bytes
from streams.scoring import SCORING_BLOCK
from streams.topics import MAX_MESSAGE_BYTES

#: The largest JointPosterior value (JSON bytes) the population agent sends: the
#: topic's message limit less room for the key and Kafka's record framing
#: (aiokafka counts key, value and under 100 bytes of framing against it).
POSTERIOR_VALUE_LIMIT = MAX_MESSAGE_BYTES - 4096


def joint_measure_model(model: ModelConfig) -> ModelConfig:
    """A streamed measure's model as part of a joint group: the same
    (standardisation, time trend, cohort level) without the recent window
    (drift monitoring's fast forgetting), which is no part of the joint fit."""
    return model.model_copy(update={"recent_half_life": None})


def joint_config(group: JointGroupSpec, models: Mapping[str, ModelConfig]) -> JointConfig:
    """The joint model of a group: each measure's streaming model (its
    standardisation and time trend). CatalogueError for a measure whose model
    has what the joint model does not (patient or time-varying covariates,
    further grouping levels, forgetting)."""
    measures = []
    for name in group.measures:
        model = models[name]
        unsupported = [
            what
            for what, present in (
                ("patient covariates", bool(model.covariates)),
                ("time-varying covariates", bool(model.time_covariates)),
                ("grouping_levels", bool(model.grouping_levels)),
                ("a forgetting half-life (EFFICACY_HALF_LIFE_DAYS)", model.half_life is not None),
            )
            if present
        ]
        if unsupported:
            raise CatalogueError(
                f"joint group {group.name}: {name}'s streaming model has "
                f"{', '.join(unsupported)}, which the joint model does not take"
            )
        measures.append(joint_measure_model(model))
    try:
        return JointConfig(measures=tuple(measures))
    except ValueError as error:
        raise CatalogueError(f"joint group {group.name}: {error}") from None


def joint_models(catalogue: Catalogue, models: Mapping[str, ModelConfig]) -> dict[str, JointConfig]:
    """Every joint group's model, by group name (CatalogueError as joint_config)."""
    return {group.name: joint_config(group, models) for group in catalogue.joint}


@dataclass(frozen=True)
class JointSnapshot:
    """A joint group's evidence: ``patient_ids`` every patient with evidence of
    any of its measures, ``gram`` (P, M, d, d) their standardised Gram matrices
    (zero blocks where a patient has none), ``cohort`` (P,) their cohort index
    into ``cohorts`` (the first measure's book with the patient says)."""

    patient_ids: list[str]
    gram: np.ndarray
    cohort: np.ndarray
    cohorts: list[str]


def joint_snapshot(books: Sequence[PopulationBook | None], config: JointConfig) -> JointSnapshot:
    """The group's evidence from its measures' books (one per measure, in the
    group's order; None: no evidence of it yet): no second copy of the
    evidence is kept."""
    rows: dict[str, int] = {}
    cohort_index: dict[str, int] = {}  # label -> index into the snapshot's cohorts
    cohort_of: dict[str, int] = {}
    parts = []
    for book in books:
        if book is None:
            parts.append(None)
            continue
        stats, cohort, labels = book.snapshot()
        ids = book.patient_ids
        for patient_id, index in zip(ids, cohort, strict=True):
            if patient_id not in rows:
                rows[patient_id] = len(rows)
                label = labels[index]
                cohort_of[patient_id] = cohort_index.setdefault(label, len(cohort_index))
        parts.append((ids, stats.gram))
    d = config.stat_dim
    gram = np.zeros((len(rows), config.num_measures, d, d))
    for m, part in enumerate(parts):
        if part is not None:
            ids, grams = part
            gram[[rows[i] for i in ids], m] = grams
    cohort = np.array([cohort_of[i] for i in rows], dtype=np.int32)
    return JointSnapshot(list(rows), gram, cohort, list(cohort_index))


def joint_digest(snapshot: JointSnapshot) -> str:
    """SHA-256 of the (patient, cohort, statistics) rows of a snapshot,
    independent of the order of the rows."""
    order = np.argsort(snapshot.patient_ids)
    digest = hashlib.sha256()
    for i in order:
        digest.update(snapshot.patient_ids[i].encode())
        digest.update(snapshot.cohorts[snapshot.cohort[i]].encode())
        digest.update(np.ascontiguousarray(snapshot.gram[i]).tobytes())
    return digest.hexdigest()


def _key(group: str, version: int) -> jax.Array:
    """Draws fixed by (group, version): scores are reproducible."""
    return jax.random.fold_in(
        jax.random.PRNGKey(zlib.crc32(posterior_key(group).encode())), version
    )


def joint_fitter_of(pool: FitterPool, config: JointConfig) -> PopulationFitter:
    """The pool's fitter of a joint model's structure (one compile per shape,
    through the pool's export cache, as every measure's fit)."""
    return pool.fitter(config, build=lambda structure, svi: joint_fitter(structure, svi))


@dataclass
class JointFitResult:
    message: JointPosterior
    info: UpdateInfo
    seconds: float


class JointModel:
    """The variational state of one joint group; ``fit`` is the sequential
    update (warm after the first, as streams.population_book.PopulationModel)."""

    def __init__(
        self, group: str, measures: Sequence[str], config: JointConfig, pool: FitterPool,
        max_rounds: int = 20, signs: np.ndarray | None = None,
    ) -> None:  # fmt: skip
        self.group = group
        self.measures = list(measures)
        # each measure's benefit sign, for the common factor (benefit_signs)
        self.signs = np.ones(len(self.measures)) if signs is None else np.asarray(signs)
        self.config = config
        self.pool = pool
        self.fitter = joint_fitter_of(pool, config)
        self.max_rounds = max_rounds
        self.state: FitState | None = None
        self.version = 0
        self.resume_from: JointPosterior | None = None

    def continue_from(self, message: JointPosterior) -> None:
        """Continue the published sequence (version and, on the first fit, q)."""
        self.version = message.version
        if self.state is None:
            self.resume_from = message

    def fit(self, snapshot: JointSnapshot) -> JointFitResult:
        """Continue SVI against all the group's evidence and build the next
        posterior message. Blocking; run it off the event loop. With a cohort
        level the message carries each draw's posterior of every cohort's u_g
        (the snapshot's cohorts)."""
        started = time.perf_counter()
        num_cohorts = max(len(snapshot.cohorts), 1)
        evidence = pad_joint(snapshot.gram, snapshot.cohort, num_cohorts)
        version = self.version + 1
        key_fit, key_draws, key_summary = jax.random.split(_key(self.group, version), 3)
        state = self.state
        if state is None:
            state = self.pool.initial_state(self.fitter, evidence)
            message, self.resume_from = self.resume_from, None
            if message is not None:
                state = self.pool.resume(self.fitter, state, message)
        state, info, steps = fit_until_converged(
            self.fitter, state, evidence, key_fit, self.max_rounds
        )
        draws = self.fitter.draws(state, key_draws)
        summary_draws = self.fitter.draws(state, key_summary, 1000)
        transform = self.fitter.guide.get_transform(self.fitter.params(state))
        cohort_mean = cohort_cov = np.zeros((0,))
        if self.config.cohort_level:
            means, covs = cohort_posteriors(
                draws, evidence.gram, evidence.cohort, evidence.num_cohorts, self.config.structure
            )
            count = len(snapshot.cohorts)
            cohort_mean, cohort_cov = np.asarray(means)[:, :count], np.asarray(covs)[:, :count]
        message = JointPosterior(
            event_id=f"posterior:{posterior_key(self.group)}:{version}",
            event_time=datetime.now(UTC),
            group=self.group,
            version=version,
            measures=self.measures,
            num_patients=len(snapshot.patient_ids),
            num_observations=snapshot.gram[:, :, 0, 0].sum(axis=0).tolist(),
            elbo=info.elbo,
            svi_steps=steps,
            converged=info.converged,
            standardization=[m.standardization.model_dump() for m in self.config.measures],
            draws={
                f: np.asarray(getattr(draws, f)).tolist()
                for f in JointHyper._fields
                if getattr(draws, f) is not None
            },
            effect_correlation=describe_correlation(summary_draws),
            effect_factor=describe_common_factor(summary_draws, self.signs),
            summary=population_summary(summary_draws, self.config, self.measures),
            unconstrained_loc=np.asarray(transform.loc).tolist(),
            unconstrained_scale_tril=np.asarray(transform.scale_tril).tolist(),
            cohorts=list(snapshot.cohorts) if self.config.cohort_level else [],
            cohort_mean=cohort_mean.tolist(),
            cohort_cov=cohort_cov.tolist(),
        )
        self.state, self.version = state, version
        return JointFitResult(message, info, time.perf_counter() - started)


def thin_draws(message: JointPosterior, keep: int) -> JointPosterior:
    """The posterior with ``keep`` of its S draws, evenly spaced (draw ⌊kS/keep⌋
    for k < keep): the same draws of θ and of the cohort tables (``cohort_mean``
    and ``cohort_cov`` are per draw of θ), so the posterior stays consistent.
    The summaries (from their own draws) and q(θ) are kept as they are."""
    count = len(message.draws["mu"])
    if not 1 <= keep <= count:
        raise ValueError(f"keep must lie in [1, {count}], got {keep}")
    index = (np.arange(keep) * count) // keep

    def pick(values: list) -> list:
        return [values[i] for i in index] if values else values

    return message.model_copy(
        update={
            "draws": {name: pick(values) for name, values in message.draws.items()},
            "cohort_mean": pick(message.cohort_mean),
            "cohort_cov": pick(message.cohort_cov),
        }
    )


class PosteriorTooLarge(ValueError):
    """Even one draw of a joint posterior exceeds the message limit."""


class SizedPosterior(NamedTuple):
    """A posterior that fits the message limit: ``message`` and its JSON
    ``value``, and the size and number of draws of the posterior it came from
    (``thinned``: fewer draws than that)."""

    message: JointPosterior
    value: bytes
    original_bytes: int
    original_draws: int

    @property
    def draws(self) -> int:
        return len(self.message.draws["mu"])

    @property
    def thinned(self) -> bool:
        return self.draws < self.original_draws


def fit_to_size(message: JointPosterior, limit: int) -> SizedPosterior:
    """``message`` as JSON if it is at most ``limit`` bytes, else thinned
    (thin_draws) to the largest number of draws whose JSON fits. The size is
    nearly linear in the draws: a binary search over the count, its first
    probes where the line through one draw and all of them crosses the limit
    (two or three serialisations in all, typically). PosteriorTooLarge if one
    draw does not fit (the rest of the message alone is too large)."""
    count = len(message.draws["mu"])
    value = json_bytes(message)
    if len(value) <= limit:
        return SizedPosterior(message, value, len(value), count)
    encoded: dict[int, tuple[JointPosterior, bytes]] = {count: (message, value)}

    def size(keep: int) -> int:
        if keep not in encoded:
            thinned = thin_draws(message, keep)
            encoded[keep] = (thinned, json_bytes(thinned))
        return len(encoded[keep][1])

    if size(1) > limit:
        raise PosteriorTooLarge(
            f"joint posterior {message.group} v{message.version}: {size(1)} bytes with one "
            f"draw, over the limit of {limit}"
        )
    per_draw = max((len(value) - size(1)) / max(count - 1, 1), 1.0)
    estimate = 1 + int((limit - size(1)) // per_draw)
    probes = [estimate, estimate + 1]
    low, high = 1, count  # size(low) <= limit < size(high)
    while high - low > 1:
        while probes and not low < probes[0] < high:
            probes.pop(0)
        middle = probes.pop(0) if probes else (low + high) // 2
        if size(middle) <= limit:
            low = middle
        else:
            high = middle
    thinned, thinned_value = encoded[low]
    return SizedPosterior(thinned, thinned_value, len(value), count)


def effect_scale(standardization: Standardization) -> float:
    """Raw effect per standardised effect: outcome scale / exposure scale."""
    return standardization.outcome_scale / standardization.exposure_scale


def population_summary(
    draws: JointHyper, config: JointConfig, measures: Sequence[str]
) -> dict[str, Interval]:
    """Each measure's population mean effect and between-patient sd of the
    effect (raw units) from draws of θ."""
    summary = {}
    for m, (name, measure) in enumerate(zip(measures, config.measures, strict=True)):
        scale = effect_scale(measure.standardization)
        summary[f"effect_{name}"] = interval_of(describe(np.asarray(draws.mu[:, m, 1]) * scale))
        summary[f"effect_sd_patients_{name}"] = interval_of(
            describe(np.asarray(draws.tau[:, 2 * m + 1]) * scale)
        )
    return summary


def posterior_draws(message: JointPosterior) -> JointHyper:
    """The draws of θ a JointPosterior carries (without ``tau_cohort``: a
    posterior of a model without a cohort level)."""
    return JointHyper(
        **{
            f: jnp.asarray(message.draws[f], dtype=float)
            for f in JointHyper._fields
            if message.draws.get(f) is not None
        }
    )


def message_config(message: JointPosterior, config: JointConfig) -> JointConfig:
    """``config`` with the standardisations the posterior was fitted under, and
    without a cohort level when the posterior has no draws of τ_u (one
    published before the joint model had a cohort level)."""
    cohort_level = config.cohort_level and message.draws.get("tau_cohort") is not None
    measures = tuple(
        measure.model_copy(
            update={"standardization": Standardization(**std), "cohort_level": cohort_level}
        )
        for measure, std in zip(config.measures, message.standardization, strict=True)
    )
    return config.model_copy(update={"measures": measures})


def benefit_signs(specs: Sequence[MeasureSpec]) -> np.ndarray:
    """+1 where higher is better, −1 where lower is (model.joint's s_m)."""
    return np.array([1.0 if spec.direction == "higher" else -1.0 for spec in specs])


def cohort_moments(
    message: JointPosterior, draws: JointHyper, cohorts: Sequence[str | None] | None, count: int
) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """Each patient's index into the posterior's cohorts (P,) and the cohorts'
    posteriors of u_g per draw, (S, G + 1, M) and (S, G + 1, M, M): the last
    slot is u_g's prior N(0, diag(τ_u²)), for a patient whose cohort the
    posterior does not know (or without a cohort: None)."""
    tau = np.asarray(draws.tau_cohort, dtype=float)  # (S, M)
    num_draws, measures = tau.shape
    known = {label: g for g, label in enumerate(message.cohorts)}
    unseen = len(known)
    labels = [None] * count if cohorts is None else list(cohorts)
    index = np.array([known.get(label, unseen) for label in labels], dtype=np.int32)
    mean = np.zeros((num_draws, unseen + 1, measures))
    cov = np.zeros((num_draws, unseen + 1, measures, measures))
    if unseen:
        mean[:, :unseen] = np.asarray(message.cohort_mean, dtype=float)
        cov[:, :unseen] = np.asarray(message.cohort_cov, dtype=float)
    cov[:, unseen] = tau[:, :, None] * np.eye(measures) * tau[:, None, :]
    return index, (mean, cov)


@dataclass(frozen=True)
class JointCallInputs:
    """What a joint score's calls need besides the posterior, per patient:
    ``counts`` (P, M, 2) each measure's exposed and unexposed readings (the
    decision rule's minimums), ``previous`` each patient's last published joint
    call per measure (its hysteresis), the rule and the care pathways."""

    counts: np.ndarray
    previous: Sequence[Mapping[str, str]] = ()
    rule: DecisionRule = dataclass_field(default_factory=DecisionRule)
    pathways: Mapping[str, str] = dataclass_field(default_factory=dict)


def joint_scores(
    message: JointPosterior,
    config: JointConfig,
    specs: Sequence[MeasureSpec],
    gram: np.ndarray,
    calls: JointCallInputs | None = None,
    cohorts: Sequence[str | None] | None = None,
) -> list[JointScore]:
    """Every patient's joint score under ``message`` from all the patient's
    evidence of the group (gram (P, M, d, d), standardised as the posterior):
    model.joint.joint_patients over the posterior's draws, effects in each
    measure's unit per unit of exposure, P(benefit ≥ MCID) and P(benefit > 0)
    under the joint posterior, and each effect's call by the measures' decision
    rule (model.scores.classify). ``calls``: the inputs of the calls (None: no
    readings counted, so every call is insufficient data). With a cohort level,
    ``cohorts`` (P,) each patient's cohort label (None: unknown): the patient's
    block posterior mixes over the posterior's u_g of that cohort
    (cohort_moments)."""
    config = message_config(message, config)
    draws, signs = posterior_draws(message), benefit_signs(specs)
    scales = np.array([effect_scale(m.standardization) for m in config.measures])
    thresholds = np.array([spec.mcid for spec in specs]) / scales
    count = gram.shape[0]
    index, moments = np.zeros(count, dtype=np.int32), None
    if config.cohort_level:
        index, moments = cohort_moments(message, draws, cohorts, count)
    calls = calls or JointCallInputs(counts=np.zeros((count, len(specs), 2), dtype=int))
    parts = []
    # In blocks of SCORING_BLOCK patients, each padded to a power-of-two count
    # (zero blocks: a patient without evidence): a batch of any size reuses the
    # few compiled shapes (compile_joint_scoring).
    for start in range(0, count, SCORING_BLOCK):
        block = gram[start : start + SCORING_BLOCK]
        padded = np.zeros((bucket_size(block.shape[0], MIN_PATIENT_BUCKET), *gram.shape[1:]))
        padded[: block.shape[0]] = block
        where = np.zeros(padded.shape[0], dtype=np.int32)
        where[: block.shape[0]] = index[start : start + SCORING_BLOCK]
        found = joint_patients(
            draws, padded, config, signs, thresholds, cohort=where, cohort_moments=moments
        )
        parts.append([np.asarray(field)[: block.shape[0]] for field in found])
    found = JointPatients(*(np.concatenate(column) for column in zip(*parts, strict=True)))
    classes = [
        classify(
            found.p_benefit_ge_mcid[:, m],
            found.p_benefit_gt_0[:, m],
            calls.counts[:, m, 0],
            calls.counts[:, m, 1],
            calls.rule,
            previous=np.asarray([p.get(spec.name, "") for p in calls.previous], dtype=object)
            if calls.previous
            else None,
        ).tolist()
        for m, spec in enumerate(specs)
    ]
    scores = []
    for i in range(count):
        effects = [
            JointEffect(
                measure=spec.name,
                unit=spec.unit,
                direction=spec.direction,
                mcid=spec.mcid,
                effect=Interval(
                    mean=float(found.effect_mean[i, m] * scale),
                    sd=float(found.effect_sd[i, m] * scale),
                    lower=float(found.effect_lower[i, m] * scale),
                    upper=float(found.effect_upper[i, m] * scale),
                ),
                p_benefit_ge_mcid=float(found.p_benefit_ge_mcid[i, m]),
                p_benefit_gt_0=float(found.p_benefit_gt_0[i, m]),
                classification=classes[m][i],
                recommended_action=calls.pathways.get(classes[m][i]),
            )
            for m, (spec, scale) in enumerate(zip(specs, scales, strict=True))
        ]
        scores.append(
            JointScore(
                group=message.group,
                effects=effects,
                responsiveness=Interval(
                    mean=float(found.responsiveness_mean[i]),
                    sd=float(found.responsiveness_sd[i]),
                    lower=float(found.responsiveness_lower[i]),
                    upper=float(found.responsiveness_upper[i]),
                ),
                p_above_population=float(found.p_above_population[i]),
                population_version=message.version,
            )
        )
    return scores


def compile_joint_scoring(
    message: JointPosterior, config: JointConfig, specs: Sequence[MeasureSpec]
) -> int:
    """Compile every padded shape joint_scores uses (blocks of up to
    SCORING_BLOCK patients) by scoring empty evidence. Blocking: run it off the
    event loop, or the patients agent's first batch of each size compiles.
    Returns the number of shapes run."""
    d = config.stat_dim
    sizes = [s for s in (MIN_PATIENT_BUCKET << k for k in range(16)) if s <= SCORING_BLOCK]
    for size in sizes:
        joint_scores(message, config, specs, np.zeros((size, config.num_measures, d, d)))
    return len(sizes)


def record_grams(
    records: Sequence[PatientRecord], measures: Sequence[str], d: int
) -> tuple[np.ndarray, np.ndarray]:
    """(P, M, d, d) each record's all-time statistics of each measure (as its
    evidence to the population agent: streams.patient_state.measure_evidence),
    zero where it has none, and (P, M, 2) its exposed and unexposed readings."""
    gram = np.zeros((len(records), len(measures), d, d))
    counts = np.zeros((len(records), len(measures), 2), dtype=int)
    for i, record in enumerate(records):
        for m, measure in enumerate(measures):
            stats = record.measures.get(measure)
            if stats is not None:
                gram[i, m] = stacked([stats.gram], (d, d))[0]
                counts[i, m] = stats.count_exposed, stats.count_unexposed
    return gram, counts


def changed_materially(previous: PublishedJoint | None, score: JointScore) -> bool:
    """Publish when there is no earlier joint score, a measure's joint call
    changed, or responsiveness moved by
    ≥ 0.1 posterior sd, its sd by ≥ 5%, or P(above the population) by ≥ 0.02
    (streams.scoring.changed_materially's thresholds)."""
    if previous is None:
        return True
    rho = score.responsiveness
    sd = max(rho.sd, 1e-12)
    return (
        any(previous.calls.get(e.measure) != e.classification for e in score.effects)
        or abs(rho.mean - previous.responsiveness_mean) >= 0.1 * sd
        or abs(rho.sd - previous.responsiveness_sd) >= 0.05 * sd
        or abs(score.p_above_population - previous.p_above_population) >= 0.02
    )


def published_of(score: JointScore) -> PublishedJoint:
    return PublishedJoint(
        population_version=score.population_version,
        responsiveness_mean=score.responsiveness.mean,
        responsiveness_sd=score.responsiveness.sd,
        p_above_population=score.p_above_population,
        calls={effect.measure: effect.classification for effect in score.effects},
    )


def patients_joint_scores(
    records: Sequence[PatientRecord],
    posteriors: Mapping[str, JointPosterior],
    configs: Mapping[str, JointConfig],
    catalogue: Catalogue,
    rule: DecisionRule,
    pathways: Mapping[str, str] | None = None,
) -> dict[str, dict[str, JointScore]]:
    """Each enrolled record's joint score under every joint group with a
    posterior whose measures it has evidence of: patient id -> group -> score."""
    scores: dict[str, dict[str, JointScore]] = {}
    for group, message in posteriors.items():
        config = configs.get(group)
        declared = next((g.measures for g in catalogue.joint if g.name == group), ())
        if config is None or tuple(message.measures) != declared:
            continue  # a group this catalogue no longer declares, or declares otherwise
        members = [
            r
            for r in records
            if r.cohort is not None and any(m in r.measures for m in message.measures)
        ]
        if not members:
            continue
        specs = [catalogue.get(m) for m in message.measures]
        gram, counts = record_grams(members, message.measures, config.stat_dim)
        previous = [
            record.published_joint[group].calls if group in record.published_joint else {}
            for record in members
        ]
        calls = JointCallInputs(counts, previous, rule, pathways or {})
        cohorts = [record.cohort for record in members]
        found = joint_scores(message, config, specs, gram, calls, cohorts)
        for record, score in zip(members, found, strict=True):
            scores.setdefault(record.patient_id, {})[group] = score
    return scores
