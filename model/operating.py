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
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from model.config import DecisionRule, MeasureConfig, ModelConfig, Standardization, SVIConfig
from model.evidence import events_stats
from model.population import PopulationFitter, pad_evidence
from model.scores import Classification, classify, summarize_effects
from model.simulate import ProgrammeSpec, simulate

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
    time by the mean and sd of enrolment U(0, span/2) plus follow-up U(0, span)."""
    exposed = 1.0 - spec.baseline_fraction
    effect = spec.effect * spec.dose
    var = (
        spec.intercept_sd**2
        + spec.residual_sd**2
        + (spec.effect_sd**2 + spec.cohort_effect_sd**2) * spec.dose**2 * exposed
        + effect**2 * exposed * (1.0 - exposed)
    )
    span = spec.time_span
    time_location, time_scale = 0.75 * span, span * math.sqrt(1.0 / 48.0 + 1.0 / 12.0)
    var += (spec.time_trend * time_scale) ** 2
    return Standardization(
        outcome_location=spec.intercept + effect * exposed + spec.time_trend * time_location,
        outcome_scale=math.sqrt(var),
        exposure_scale=abs(spec.dose) if spec.dose else 1.0,
        time_location=time_location,
        time_scale=time_scale,
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
            replicate_seed = seed + replicate
            sim = simulate(spec.model_copy(update={"obs_per_patient": int(n)}), replicate_seed)
            events = sim.events
            stats = events_stats(events, config)
            evidence = pad_evidence(stats, events.cohort_of_patient, spec.num_cohorts)
            keys = jax.random.split(jax.random.PRNGKey(replicate_seed), 3)
            state = fitter.init(keys[0], evidence)
            state, info = fitter.update(state, evidence, keys[1])
            draws = fitter.draws(state, keys[2])
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
