"""Operating characteristics of the responder calls, by simulation.

For a chosen truth (a ProgrammeSpec: population effect β, between-patient sd of
the effect, cohort sd, residual sd, design) and a measure (direction, MCID), and
for each number of observations per patient n in a grid, R programmes are
simulated (replicate r uses seed r for every n, so the patients' true effects are
the same across n: common random numbers make the trend in n visible), fitted
with the collapsed SVI (model.population, model.scores) and classified with the
decision rule. With benefit_i = sign · b_i (true, per unit exposure):

- responder-call rate       P(call = responder     | benefit_i ≥ MCID)
- non-responder-call rate   P(call = non-responder | benefit_i ≤ 0)
- false non-responder rate  P(call = non-responder | benefit_i ≥ MCID)
- false responder rate      P(call = responder     | benefit_i ≤ 0)
- insufficient-data rate    P(call = insufficient data)

Each rate is pooled over replicates, p = Σ_r h_r / Σ_r m_r (hits h_r among m_r
eligible patients of replicate r). Its Monte Carlo standard error treats
replicates as clusters (patients of one programme share a fitted q(θ)), the
ratio-estimator variance

    se² = Σ_r (h_r − p m_r)² / (R (R − 1) m̄²),

and falls back to the binomial sqrt(p(1 − p)/m) with a single replicate.

Every fit uses the same standardisation (derived from the spec, not the data),
so the SVI step compiles once for the whole run.

**Subgroup calls** (``subgroup_operating_characteristics``, ``efficacy oc
--subgroups``): the truth has a categorical effect modifier, ``group`` with
levels 0 (the reference) .. L−1 whose effects are β + shift_ℓ (and the
covariate ``age``, which modifies nothing unless the spec says so). Every
programme is fitted with both covariates in the model, each level's patients
form a subgroup, and the subgroup calls (model.subgroups: works /
does_not_work / uncertain / insufficient_data) are counted per level. A level's
rate is over programmes, one call each: a binomial proportion, se sqrt(p(1−p)/R).
A call of ``works`` for a level with no benefit by design (sign · (β + shift) ≤
0) is a false "works"; ``works`` for a level with at least the MCID of benefit
is the power, and ``does_not_work`` there the false "does not work".
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np

from model.config import DecisionRule, MeasureConfig, ModelConfig, Standardization, SVIConfig
from model.evidence import PatientStats, events_stats
from model.likelihood import Hyper
from model.population import Evidence, PopulationFitter, UpdateInfo, pad_evidence
from model.scores import Classification, classify, summarize_effects
from model.simulate import ProgrammeSpec, Simulated, simulate
from model.subgroups import subgroup_calls, summarize_subgroups

RATES = {
    "responder_called_responder": ("true_responder", Classification.RESPONDER),
    "nonresponder_called_nonresponder": ("true_nonresponder", Classification.NON_RESPONDER),
    "false_nonresponder": ("true_responder", Classification.NON_RESPONDER),
    "false_responder": ("true_nonresponder", Classification.RESPONDER),
    "insufficient_data": ("all", Classification.INSUFFICIENT_DATA),
}
RATE_LABELS = {
    "responder_called_responder": "true responders called responder",
    "nonresponder_called_nonresponder": "true non-responders called non-responder",
    "false_nonresponder": "true responders called non-responder (false non-responder)",
    "false_responder": "true non-responders called responder",
    "insufficient_data": "insufficient data",
}


def standardization_for(spec: ProgrammeSpec) -> Standardization:
    """A data-free standardisation close to the one the data would give: outcome
    centred at the mean intercept plus the average exposed effect and trend, scaled
    by sqrt(intercept_sd² + residual_sd² + (effect_sd² + cohort_sd²) dose² f +
    (β·dose)² f(1−f) + (γ sd_t)²) with f the exposed fraction; exposure by the dose;
    time by the mean and sd of enrolment U(0, span/2) plus follow-up U(0, span).

    With ``spec.with_covariates`` the patient covariates as simulated: age at
    (age_mean, age_sd), each group indicator at (1/L, sqrt((1/L)(1 − 1/L))) for L
    equally likely levels; β is then the average over the groups (mean age) and
    the modifiers' spread (group shifts, age · effect_per_year, age ·
    intercept_per_year) adds to the between-patient variances above."""
    exposed = 1.0 - spec.baseline_fraction
    shifts = np.array([0.0, *spec.group_effects]) if spec.with_covariates else np.zeros(1)
    effect = (spec.effect + float(shifts.mean())) * spec.dose
    effect_var = spec.effect_sd**2 + spec.cohort_effect_sd**2
    intercept_var = spec.intercept_sd**2
    if spec.with_covariates:
        effect_var += float(shifts.var()) + (spec.effect_per_year * spec.age_sd) ** 2
        intercept_var += (spec.intercept_per_year * spec.age_sd) ** 2
    var = (
        intercept_var
        + spec.residual_sd**2
        + effect_var * spec.dose**2 * exposed
        + effect**2 * exposed * (1.0 - exposed)
    )
    span = spec.time_span
    time_location, time_scale = 0.75 * span, span * math.sqrt(1.0 / 48.0 + 1.0 / 12.0)
    var += (spec.time_trend * time_scale) ** 2
    covariate_location: tuple[float, ...] = ()
    covariate_scale: tuple[float, ...] = ()
    if spec.with_covariates:
        share = 1.0 / shifts.size
        indicators = shifts.size - 1
        covariate_location = (spec.age_mean, *[share] * indicators)
        covariate_scale = (spec.age_sd, *[math.sqrt(share * (1.0 - share))] * indicators)
    return Standardization(
        outcome_location=spec.intercept + effect * exposed + spec.time_trend * time_location,
        outcome_scale=math.sqrt(var),
        exposure_scale=abs(spec.dose) if spec.dose else 1.0,
        time_location=time_location,
        time_scale=time_scale,
        covariate_location=covariate_location,
        covariate_scale=covariate_scale,
    )


def rate_with_se(hits: np.ndarray, totals: np.ndarray) -> tuple[float, float, int]:
    """Pooled rate over replicates, its cluster Monte Carlo se, and the pooled count
    (module docstring). NaN rate when no patient was eligible."""
    hits, totals = np.asarray(hits, float), np.asarray(totals, float)
    total = float(totals.sum())
    if total == 0:
        return float("nan"), float("nan"), 0
    p = float(hits.sum() / total)
    replicates = hits.size
    if replicates < 2:
        return p, math.sqrt(p * (1.0 - p) / total), int(total)
    mean_total = total / replicates
    var = np.sum((hits - p * totals) ** 2) / (replicates * (replicates - 1) * mean_total**2)
    return p, float(math.sqrt(var)), int(total)


def replicate_counts(
    true_benefit: np.ndarray, calls: np.ndarray, mcid: float
) -> dict[str, tuple[int, int]]:
    """(hits, eligible) of every rate in one simulated programme."""
    groups = {
        "true_responder": true_benefit >= mcid,
        "true_nonresponder": true_benefit <= 0.0,
        "all": np.ones_like(true_benefit, dtype=bool),
    }
    return {
        name: (int(np.sum(groups[group] & (calls == call.value))), int(np.sum(groups[group])))
        for name, (group, call) in RATES.items()
    }


class Replicate(NamedTuple):
    """One simulated programme fitted (operating_characteristics' inner step)."""

    sim: Simulated
    stats: PatientStats
    evidence: Evidence
    covariates: np.ndarray | None  # standardised, when the fitter's model has them
    draws: Hyper
    info: UpdateInfo


def fit_replicate(
    spec: ProgrammeSpec, obs_per_patient: int, seed: int, fitter: PopulationFitter
) -> Replicate:
    """Simulate ``spec`` with ``obs_per_patient`` readings (seeded by ``seed``),
    fit q(θ) fresh and draw θ from it: the same keys for every observation count,
    so replicate r has the same true effects in every row."""
    config = fitter.config
    sim = simulate(spec.model_copy(update={"obs_per_patient": obs_per_patient}), seed)
    events = sim.events
    stats = events_stats(events, config)
    covariates = (
        config.standardization.covariates(events.covariates) if config.num_covariates else None
    )
    evidence = pad_evidence(stats, events.cohort_of_patient, spec.num_cohorts, covariates)
    keys = jax.random.split(jax.random.PRNGKey(seed), 3)
    state = fitter.init(keys[0], evidence)
    state, info = fitter.update(state, evidence, keys[1])
    return Replicate(sim, stats, evidence, covariates, fitter.draws(state, keys[2]), info)


def operating_characteristics(
    spec: ProgrammeSpec,
    measure: MeasureConfig,
    obs_per_patient: Sequence[int],
    replicates: int,
    *,
    seed: int = 0,
    rule: DecisionRule | None = None,
    svi_config: SVIConfig | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Simulate, fit and classify ``replicates`` programmes per entry of
    ``obs_per_patient``; return a JSON-ready dict with the settings and one row
    per observation count holding each rate's ``rate``, ``se``, eligible ``n`` and
    ``per_replicate`` [hits, eligible] (replicate r has the same true effects in
    every row, so rows can be compared pairwise)."""
    rule = rule or DecisionRule()
    svi_config = svi_config or SVIConfig()
    say = progress or (lambda _message: None)
    config = ModelConfig(
        time_trend=True,
        cohort_level=spec.num_cohorts > 1,
        standardization=standardization_for(spec),
    )
    fitter = PopulationFitter(config, svi_config)
    rows = []
    for n in obs_per_patient:
        counts: dict[str, list[tuple[int, int]]] = {name: [] for name in RATES}
        for replicate in range(replicates):
            sim, stats, evidence, _, draws, info = fit_replicate(
                spec, int(n), seed + replicate, fitter
            )
            events = sim.events
            summary = summarize_effects(
                draws, stats.gram, events.cohort_of_patient, evidence.num_cohorts, measure, config
            )
            calls = classify(
                summary.p_benefit_ge_mcid,
                summary.p_benefit_gt_0,
                stats.count_exposed,
                stats.count_unexposed,
                rule,
            )
            # per unit exposure, as the scores state P(benefit ≥ MCID)
            true_benefit = measure.benefit_sign * sim.truth.effect
            for name, value in replicate_counts(true_benefit, calls, measure.mcid).items():
                counts[name].append(value)
            say(
                f"{n} obs/patient, replicate {replicate + 1}/{replicates}: ELBO {info.elbo:,.1f}, "
                f"responders called {counts['responder_called_responder'][-1][0]}/"
                f"{counts['responder_called_responder'][-1][1]}, false non-responders "
                f"{counts['false_nonresponder'][-1][0]}"
            )
        row: dict[str, Any] = {"obs_per_patient": int(n)}
        for name, values in counts.items():
            hits, totals = np.array(values).T
            rate, se, eligible = rate_with_se(hits, totals)
            row[name] = {"rate": rate, "se": se, "n": eligible, "per_replicate": values}
        rows.append(row)
    return {
        "truth": spec.model_dump(mode="json"),
        "measure": measure.model_dump(mode="json"),
        "rule": rule.model_dump(mode="json"),
        "svi": svi_config.model_dump(mode="json"),
        "replicates": replicates,
        "seed": seed,
        "rows": rows,
    }


def markdown_table(result: dict[str, Any]) -> str:
    """The rates (± Monte Carlo se) against observations per patient, as markdown."""
    names = list(RATES)
    header = "| obs/patient | " + " | ".join(RATE_LABELS[name] for name in names) + " |"
    lines = [header, "|---:|" + "---:|" * len(names)]
    for row in result["rows"]:
        cells = [
            f"{row[name]['rate']:.3f} ± {row[name]['se']:.3f}"
            if not math.isnan(row[name]["rate"])
            else "n/a"
            for name in names
        ]
        lines.append(f"| {row['obs_per_patient']} | " + " | ".join(cells) + " |")
    eligible = result["rows"][0]
    lines.append("")
    lines.append(
        f"Per row: {result['replicates']} simulated programmes; eligible patients pooled: "
        f"{eligible['responder_called_responder']['n']} true responders (benefit ≥ MCID), "
        f"{eligible['nonresponder_called_nonresponder']['n']} true non-responders "
        f"(benefit ≤ 0), {eligible['insufficient_data']['n']} in all. "
        "± is the Monte Carlo standard error (replicates as clusters)."
    )
    return "\n".join(lines)


SUBGROUP_CALL_NAMES = ("works", "does_not_work", "uncertain", "insufficient_data")


def binomial_rate(hits: int, total: int) -> dict[str, float | int]:
    """A proportion over independent programmes and its binomial se (NaN: none)."""
    if total == 0:
        return {"rate": float("nan"), "se": float("nan"), "hits": 0, "n": 0}
    p = hits / total
    return {"rate": p, "se": math.sqrt(p * (1.0 - p) / total), "hits": int(hits), "n": int(total)}


def group_levels(spec: ProgrammeSpec, covariates: np.ndarray) -> np.ndarray:
    """Each patient's group level 0..L−1 from the simulated design (age, then the
    indicators of levels 1..L−1)."""
    indicators = np.asarray(covariates)[:, 1 : 1 + len(spec.group_effects)]
    return np.where(indicators.any(axis=1), indicators.argmax(axis=1) + 1, 0)


def subgroup_operating_characteristics(
    spec: ProgrammeSpec,
    measure: MeasureConfig,
    obs_per_patient: Sequence[int],
    replicates: int,
    *,
    seed: int = 0,
    rule: DecisionRule | None = None,
    svi_config: SVIConfig | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """The subgroup calls' rates per group level (module docstring): for every
    entry of ``obs_per_patient``, ``replicates`` programmes (seed + r) with the
    patient covariates in the model, one subgroup per level of ``group``.
    JSON-ready: one row per observation count with, per level, its design effect
    (β + shift, raw units per full dose), each call's rate (binomial se), how
    often the 90% interval covered the subgroup's true mean effect, and the
    pooled ``false_works`` (levels without benefit), ``power`` and
    ``false_does_not_work`` (levels with ≥ MCID of benefit)."""
    if not spec.group_effects:
        raise ValueError("subgroup OC needs group_effects: a group with at least two levels")
    if spec.time_covariate_effect is not None:
        raise ValueError("subgroup OC simulates no time-varying covariate")
    spec = spec.model_copy(update={"with_covariates": True})
    rule = rule or DecisionRule()
    svi_config = svi_config or SVIConfig()
    say = progress or (lambda _message: None)
    shifts = (0.0, *spec.group_effects)
    levels = len(shifts)
    config = ModelConfig(
        time_trend=True,
        cohort_level=spec.num_cohorts > 1,
        covariates=("age", *(f"group={level}" for level in range(1, levels))),
        standardization=standardization_for(spec),
    )
    fitter = PopulationFitter(config, svi_config)
    design_benefit = [measure.benefit_sign * (spec.effect + shift) for shift in shifts]
    no_benefit = [level for level in range(levels) if design_benefit[level] <= 0.0]
    benefit = [level for level in range(levels) if design_benefit[level] >= measure.mcid]
    rows = []
    for n in obs_per_patient:
        calls: list[list[str]] = [[] for _ in range(levels)]
        covered: list[list[bool]] = [[] for _ in range(levels)]
        true_means: list[list[float]] = [[] for _ in range(levels)]
        for replicate in range(replicates):
            sim, stats, evidence, covariates, draws, info = fit_replicate(
                spec, int(n), seed + replicate, fitter
            )
            events = sim.events
            group = group_levels(spec, events.covariates)
            membership = np.stack([(group == level).astype(float) for level in range(levels)])
            summary = summarize_subgroups(
                draws,
                stats.gram,
                events.cohort_of_patient,
                evidence.num_cohorts,
                membership,
                measure,
                config,
                covariates=covariates,
            )
            replicate_calls = subgroup_calls(summary, rule)
            for level in range(levels):
                members = group == level
                truth = float(sim.truth.effect[members].mean()) if members.any() else np.nan
                calls[level].append(replicate_calls[level])
                true_means[level].append(truth)
                covered[level].append(bool(summary.lower[level] <= truth <= summary.upper[level]))
            say(
                f"{n} obs/patient, replicate {replicate + 1}/{replicates}: ELBO {info.elbo:,.1f}, "
                + ", ".join(
                    f"group {level} {replicate_calls[level]} "
                    f"(P(≥ MCID) {summary.p_benefit_ge_mcid[level]:.3f})"
                    for level in range(levels)
                )
            )
        by_level = []
        for level in range(levels):
            entry: dict[str, Any] = {
                "level": level,
                "design_effect": spec.effect + shifts[level],
                "true_mean_effect": float(np.nanmean(true_means[level])),
                "interval_covers_true_mean": binomial_rate(sum(covered[level]), replicates),
                "per_replicate": calls[level],
            }
            for call in SUBGROUP_CALL_NAMES:
                entry[call] = binomial_rate(calls[level].count(call), replicates)
            by_level.append(entry)

        def pooled(calls: list[list[str]], chosen: list[int], call: str) -> dict[str, float | int]:
            hits = sum(calls[level].count(call) for level in chosen)
            return binomial_rate(hits, replicates * len(chosen))

        rows.append(
            {
                "obs_per_patient": int(n),
                "levels": by_level,
                "false_works": pooled(calls, no_benefit, "works"),
                "power": pooled(calls, benefit, "works"),
                "false_does_not_work": pooled(calls, benefit, "does_not_work"),
            }
        )
    return {
        "kind": "subgroups",
        "truth": spec.model_dump(mode="json"),
        "measure": measure.model_dump(mode="json"),
        "rule": rule.model_dump(mode="json"),
        "svi": svi_config.model_dump(mode="json"),
        "replicates": replicates,
        "seed": seed,
        "rows": rows,
    }


def subgroup_markdown_table(result: dict[str, Any]) -> str:
    """Per observation count and group level: each call's rate ± binomial se."""

    def cell(value: dict[str, Any]) -> str:
        if value["n"] == 0:
            return "n/a"
        return f"{value['rate']:.3f} ± {value['se']:.3f}"

    lines = [
        "| obs/patient | group | effect (design) | works | does not work | uncertain "
        "| insufficient data | 90% interval covers the true mean |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        for level in row["levels"]:
            cells = [cell(level[name]) for name in SUBGROUP_CALL_NAMES]
            lines.append(
                f"| {row['obs_per_patient']} | {level['level']} | {level['design_effect']:g} | "
                + " | ".join(cells)
                + f" | {cell(level['interval_covers_true_mean'])} |"
            )
    lines.append("")
    lines.append(
        '| obs/patient | false "works" (groups without benefit) | power: "works" '
        '(groups with ≥ MCID) | false "does not work" (groups with ≥ MCID) |'
    )
    lines.append("|---:|---:|---:|---:|")
    for row in result["rows"]:
        lines.append(
            f"| {row['obs_per_patient']} | {cell(row['false_works'])} | {cell(row['power'])} | "
            f"{cell(row['false_does_not_work'])} |"
        )
    lines.append("")
    lines.append(
        f"Per row: {result['replicates']} simulated programmes, one call per group each; "
        f"MCID {result['measure']['mcid']:g} ({result['measure']['direction']} is better). "
        "± is the binomial standard error over programmes; it is 0 when every "
        f"programme gave the same call, and 0 of {result['replicates']} bounds a rate "
        f"below {min(1.0, 3 / result['replicates']):.3f} (95%, rule of three)."
    )
    return "\n".join(lines)
