"""Accuracy of the collapsed streaming method (issue 3, items 3-6).

1. Fidelity against NUTS on the full, non-collapsed model (500 patients in 20
   cohorts, 30 observations each): the project's collapsed SVI and the naive
   mean-field ADVI (AutoNormal over every parameter) side by side.
2. Sequential: 20 warm-started updates as batches arrive by event time against a
   one-shot fit on all data, and the cost of one warm update against a fresh fit.
3. Calibration: coverage of 90% intervals of the true effects over simulated
   programmes (several seeds, missing readings, two designs).
4. sleepstudy: the real data set against lme4's published REML fit.

Run ``python -m benchmarks.fidelity`` (``--quick`` for a smaller, rougher run).
Progress goes to stderr; results to benchmarks/results/fidelity.json.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import numpy as np

from benchmarks.common import machine, median, say, timed, write_json
from model.config import MeasureConfig, ModelConfig, SVIConfig
from model.evidence import add_events, empty_stats, events_stats
from model.offline import fit_programme, model_config_for
from model.population import FitState, PopulationFitter, pad_evidence
from model.reference import ReferenceFit, fit_naive_advi, fit_nuts
from model.scores import EffectSummary, summarize_effects
from model.simulate import ProgrammeSpec, Simulated, simulate

SLEEPSTUDY = Path(__file__).resolve().parents[1] / "tests" / "data" / "sleepstudy"
RHR = MeasureConfig(name="resting_heart_rate", unit="bpm", direction="lower", mcid=2.0)
REACTION = MeasureConfig(name="reaction_time", unit="ms", direction="lower", mcid=5.0)
# lme4 REML fit of lmer(Reaction ~ Days + (Days | Subject)), from the data set's README.md.
LME4 = {"slope": 10.467, "slope_se": 1.546, "slope_sd": 5.922, "slope_sd_interval": [3.80, 8.75]}
# Issue 3's acceptance thresholds.
GOALS = {
    "median_standardized_error_max": 0.10,
    "median_sd_ratio_range": [0.9, 1.1],
    "population_effect_diff_max_sd": 0.2,
    "coverage_range": [0.86, 0.94],
    "sleepstudy_slope_max_se": 0.5,
    "sleepstudy_correlation_min": 0.95,
}


@dataclass(frozen=True)
class Settings:
    """Sizes of one benchmark run (full or --quick)."""

    programme: ProgrammeSpec
    programme_seed: int
    nuts_warmup: int
    nuts_samples: int
    advi_steps: int
    sequential_batches: int
    sequential_repeats: int
    fresh_fit_repeats: int
    calibration_seeds: int
    calibration_patients: int


FULL = Settings(
    programme=ProgrammeSpec(num_patients=500, num_cohorts=20, obs_per_patient=30),
    programme_seed=1,
    nuts_warmup=500,
    nuts_samples=2000,
    advi_steps=10000,
    sequential_batches=20,
    sequential_repeats=3,
    fresh_fit_repeats=5,
    calibration_seeds=5,
    calibration_patients=500,
)
QUICK = Settings(
    programme=ProgrammeSpec(num_patients=200, num_cohorts=10, obs_per_patient=20),
    programme_seed=1,
    nuts_warmup=300,
    nuts_samples=500,
    advi_steps=3000,
    sequential_batches=20,
    sequential_repeats=1,
    fresh_fit_repeats=2,
    calibration_seeds=2,
    calibration_patients=250,
)


def compare(
    mean: np.ndarray,
    sd: np.ndarray,
    population_effect: float,
    reference_mean: np.ndarray,
    reference_sd: np.ndarray,
    reference_effect: np.ndarray,
) -> dict[str, float]:
    """Issue 3's fidelity metrics of an approximation against a reference posterior.

    Per-patient effect means and sds against the reference's; the population
    effect's posterior mean against the reference's draws of it, in reference sds.
    """
    standardized_error = np.abs(mean - reference_mean) / reference_sd
    sd_ratio = sd / reference_sd
    return {
        "median_standardized_error": float(np.median(standardized_error)),
        "p90_standardized_error": float(np.quantile(standardized_error, 0.9)),
        "median_sd_ratio": float(np.median(sd_ratio)),
        "sd_ratio_q05": float(np.quantile(sd_ratio, 0.05)),
        "sd_ratio_q95": float(np.quantile(sd_ratio, 0.95)),
        "population_effect": float(population_effect),
        "population_effect_diff_in_reference_sd": float(
            abs(population_effect - reference_effect.mean()) / reference_effect.std()
        ),
    }


def within_goals(metrics: dict[str, float]) -> bool:
    """Whether fidelity metrics meet issue 3's tolerances (items 3 and 4)."""
    low, high = GOALS["median_sd_ratio_range"]
    return (
        metrics["median_standardized_error"] <= GOALS["median_standardized_error_max"]
        and low <= metrics["median_sd_ratio"] <= high
        and metrics["population_effect_diff_in_reference_sd"]
        <= GOALS["population_effect_diff_max_sd"]
    )


def against_samples(
    mean: np.ndarray, sd: np.ndarray, population_effect: float, reference: ReferenceFit
) -> dict[str, float]:
    """compare() against a sampled reference (NUTS)."""
    samples = reference.patient_effect
    return compare(
        mean,
        sd,
        population_effect,
        samples.mean(axis=0),
        samples.std(axis=0),
        reference.population["effect"],
    )


def fidelity_vs_nuts(
    sim: Simulated, settings: Settings
) -> tuple[dict[str, Any], ReferenceFit, ModelConfig]:
    """Item 3: NUTS (reference), collapsed SVI and naive ADVI on one programme."""
    events = sim.events
    config = model_config_for(events, time_trend=True, cohort_level=True)
    say(
        f"NUTS on the full model: {events.num_patients} patients, {events.patient.size} "
        f"observations, {settings.nuts_warmup} warmup + {settings.nuts_samples} draws"
    )
    nuts, nuts_seconds = timed(
        lambda: fit_nuts(
            events,
            config,
            num_warmup=settings.nuts_warmup,
            num_samples=settings.nuts_samples,
            seed=2,
        )
    )
    say(f"NUTS done in {nuts_seconds:.1f} s: {nuts.diagnostics}")

    say("collapsed SVI (fit_programme)")
    (result, summary), svi_seconds = timed(lambda: fit_programme(events, RHR, seed=3))
    svi = against_samples(
        summary.mean, summary.sd, result["population"]["effect"]["mean"], nuts
    ) | {"wall_seconds": svi_seconds, "svi_steps": result["diagnostics"]["svi_steps"]}
    svi["meets_issue_goals"] = within_goals(svi)
    say(f"SVI done in {svi_seconds:.1f} s: {svi}")

    say(f"naive ADVI (AutoNormal, {settings.advi_steps} steps)")
    naive, naive_seconds = timed(
        lambda: fit_naive_advi(events, config, steps=settings.advi_steps, seed=4)
    )
    advi = against_samples(
        naive.patient_effect.mean(axis=0),
        naive.patient_effect.std(axis=0),
        float(naive.population["effect"].mean()),
        nuts,
    ) | {"wall_seconds": naive_seconds, "steps": settings.advi_steps}
    advi["meets_issue_goals"] = within_goals(advi)
    say(f"naive ADVI done in {naive_seconds:.1f} s: {advi}")

    report = {
        "programme": sim.spec.model_dump(),
        "programme_seed": settings.programme_seed,
        "num_observations": int(events.patient.size),
        "nuts": {
            **nuts.diagnostics,
            "wall_seconds": nuts_seconds,
            "num_warmup": settings.nuts_warmup,
            "population_effect_mean": float(nuts.population["effect"].mean()),
            "population_effect_sd": float(nuts.population["effect"].std()),
        },
        "collapsed_svi": svi,
        "naive_advi": advi,
    }
    return report, nuts, config


def _summary(
    fitter: PopulationFitter, state: FitState, gram: np.ndarray, sim: Simulated, config: ModelConfig
) -> tuple[EffectSummary, np.ndarray]:
    """Patient summaries (fixed draw key) and 4000 draws of the population effect (raw)."""
    events = sim.events
    summary = summarize_effects(
        fitter.draws(state, jax.random.PRNGKey(7)),
        gram,
        events.cohort_of_patient,
        events.num_cohorts,
        RHR,
        config,
    )
    mu = np.asarray(fitter.draws(state, jax.random.PRNGKey(8), 4000).mu)
    return summary, np.asarray(config.standardization.effect_to_raw(mu[:, 1]))


def sequential(
    sim: Simulated, config: ModelConfig, nuts: ReferenceFit, settings: Settings
) -> dict[str, Any]:
    """Item 4: warm-started updates as batches arrive (by event time) against a
    one-shot fit on all data; the cost of a warm update against a fresh fit."""
    events = sim.events
    cohort, num_cohorts = events.cohort_of_patient, events.num_cohorts
    fitter = PopulationFitter(config, SVIConfig())
    all_stats = events_stats(events, config)
    all_evidence = pad_evidence(all_stats, cohort, num_cohorts)

    def fresh_fit(seed: int) -> FitState:
        state = fitter.init(jax.random.PRNGKey(seed), all_evidence)
        state, _ = fitter.update(state, all_evidence, jax.random.PRNGKey(seed + 1))
        return state

    fresh_seconds = []
    one_shot = None
    for repeat in range(settings.fresh_fit_repeats + 1):  # the first run compiles
        state, seconds = timed(lambda repeat=repeat: fresh_fit(1000 * repeat))
        fresh_seconds.append(seconds)
        one_shot = one_shot or state
        say(f"fresh fit {repeat}: {seconds:.3f} s" + (" (with compilation)" if not repeat else ""))
    assert one_shot is not None

    order = np.argsort(events.time, kind="stable")
    batches = np.array_split(order, settings.sequential_batches)
    warm_seconds: list[float] = []
    first_warm_seconds = None
    runs = []
    for repeat in range(settings.sequential_repeats):
        stats, state = empty_stats(events.num_patients, config), None
        for k, rows in enumerate(batches):
            stats = add_events(
                stats,
                events.patient[rows],
                events.exposure[rows],
                events.time[rows],
                events.outcome[rows],
                config,
            )
            evidence = pad_evidence(stats, cohort, num_cohorts)
            state = state or fitter.init(jax.random.PRNGKey(repeat), evidence)
            key = jax.random.PRNGKey(10_000 * (repeat + 1) + k)
            (state, info), seconds = timed(
                lambda state=state, evidence=evidence, key=key: fitter.update(state, evidence, key)
            )
            if k == 1 and repeat == 0:
                first_warm_seconds = seconds  # compiles the warm-update chunk
            elif k >= 1:
                warm_seconds.append(seconds)
        assert state is not None and state.version == settings.sequential_batches
        runs.append(state)
        say(
            f"sequential run {repeat}: {settings.sequential_batches} updates, last ELBO "
            f"{info.elbo:,.1f}, median warm update so far {median(warm_seconds) * 1e3:.1f} ms"
        )

    one_shot_summary, one_shot_effect = _summary(fitter, one_shot, all_stats.gram, sim, config)
    per_run = []
    for state in runs:
        seq_summary, seq_effect = _summary(fitter, state, all_stats.gram, sim, config)
        vs_one_shot = compare(
            seq_summary.mean,
            seq_summary.sd,
            float(seq_effect.mean()),
            one_shot_summary.mean,
            one_shot_summary.sd,
            one_shot_effect,
        )
        vs_one_shot["meets_issue_goals"] = within_goals(vs_one_shot)
        vs_nuts = against_samples(seq_summary.mean, seq_summary.sd, float(seq_effect.mean()), nuts)
        per_run.append({"vs_one_shot": vs_one_shot, "vs_nuts": vs_nuts})
    one_shot_vs_nuts = against_samples(
        one_shot_summary.mean, one_shot_summary.sd, float(one_shot_effect.mean()), nuts
    )
    fresh_median = median(fresh_seconds[1:])
    warm_median = median(warm_seconds)
    report = {
        "batches": settings.sequential_batches,
        "repeats": settings.sequential_repeats,
        "svi_config": SVIConfig().model_dump(),
        "note": (
            "the first update of each run starts from scratch (fresh_steps on the first "
            "batch); updates 2..20 are warm (update_steps each); timings exclude compilation"
        ),
        "runs": per_run,
        "one_shot_vs_nuts": one_shot_vs_nuts,
        "fresh_fit_seconds_median": fresh_median,
        "fresh_fit_seconds_with_compilation": fresh_seconds[0],
        "warm_update_seconds_median": warm_median,
        "warm_update_seconds_first_with_compilation": first_warm_seconds,
        "warm_over_fresh_cost_ratio": warm_median / fresh_median,
    }
    say(
        f"sequential: warm {warm_median * 1e3:.1f} ms vs fresh {fresh_median:.2f} s "
        f"(ratio {report['warm_over_fresh_cost_ratio']:.4f}); "
        f"vs one-shot {per_run[0]['vs_one_shot']}"
    )
    return report


def calibration(settings: Settings) -> dict[str, Any]:
    """Item 5: coverage of central 90% intervals of the simulated true effects."""
    covered, total, per_seed = 0, 0, []
    for seed in range(settings.calibration_seeds):
        spec = ProgrammeSpec(
            num_patients=settings.calibration_patients,
            num_cohorts=10,
            obs_per_patient=12,
            missing_rate=0.2,
            design="crossover" if seed % 2 else "baseline_then_exposure",
        )
        sim = simulate(spec, seed=100 + seed)
        _, summary = fit_programme(sim.events, RHR, seed=seed)
        truth = sim.truth.effect
        hits = int(np.sum((summary.lower <= truth) & (truth <= summary.upper)))
        covered, total = covered + hits, total + truth.size
        per_seed.append(
            {
                "seed": 100 + seed,
                "design": spec.design,
                "patients": truth.size,
                "coverage": hits / truth.size,
            }
        )
        say(f"calibration seed {100 + seed} ({spec.design}): coverage {hits / truth.size:.3f}")
    coverage = covered / total
    low, high = GOALS["coverage_range"]
    return {
        "level": 0.9,
        "patients": total,
        "coverage": coverage,
        "binomial_se": float(np.sqrt(0.9 * 0.1 / total)),
        "per_seed": per_seed,
        "spec": "10 cohorts, 12 observations per patient, 20% missing, designs alternate",
        "meets_issue_goals": bool(low <= coverage <= high),
    }


def sleepstudy(settings: Settings) -> dict[str, Any]:
    """Item 6: sleepstudy (18 subjects) against lme4's REML fit, and NUTS on the
    same model for reference."""
    from cli.fit import read_table  # the `efficacy fit` CSV reader

    table = argparse.Namespace(
        input=SLEEPSTUDY / "sleepstudy.csv",
        patient="Subject",
        exposure="Days",
        outcome="Reaction",
        cohort=None,
        time=None,
    )
    events, subjects, _ = read_table(table)
    with (SLEEPSTUDY / "lme4_subject_effects.csv").open() as handle:
        rows = [line.rstrip("\n").split(",") for line in handle]
    column = rows[0].index("coef_Days")
    lme4 = {row[0]: float(row[column]) for row in rows[1:]}
    reference = np.array([lme4[s] for s in subjects])

    say("sleepstudy: collapsed SVI")
    (result, summary), seconds = timed(
        lambda: fit_programme(events, REACTION, time_trend=False, cohort_level=False)
    )
    slope = result["population"]["effect"]
    slope_sd = result["population"]["effect_sd_patients"]
    low, high = LME4["slope_sd_interval"]
    difference_in_se = abs(slope["mean"] - LME4["slope"]) / LME4["slope_se"]
    correlation = float(np.corrcoef(summary.mean, reference)[0, 1])
    say("sleepstudy: NUTS (same model, not collapsed)")
    config = model_config_for(events, time_trend=False, cohort_level=False)
    nuts = fit_nuts(events, config, num_warmup=settings.nuts_warmup, num_samples=2000, seed=5)
    nuts_slopes = nuts.patient_effect.mean(axis=0)
    report = {
        "lme4": LME4,
        "svi": {
            "slope": slope,
            "slope_diff_in_lme4_se": difference_in_se,
            "slope_sd": slope_sd,
            "slope_sd_inside_lme4_interval": bool(low <= slope_sd["mean"] <= high),
            "correlation_with_lme4_subject_slopes": correlation,
            "max_abs_diff_subject_slopes_ms": float(np.max(np.abs(summary.mean - reference))),
            "median_subject_slope_sd": float(np.median(summary.sd)),
            "wall_seconds": seconds,
        },
        "nuts": {
            "slope_mean": float(nuts.population["effect"].mean()),
            "slope_sd_mean": float(nuts.population["effect_sd_patients"].mean()),
            "correlation_with_lme4_subject_slopes": float(
                np.corrcoef(nuts_slopes, reference)[0, 1]
            ),
            "svi_vs_nuts": against_samples(summary.mean, summary.sd, slope["mean"], nuts),
            "diagnostics": nuts.diagnostics,
        },
    }
    report["meets_issue_goals"] = bool(
        difference_in_se <= GOALS["sleepstudy_slope_max_se"]
        and report["svi"]["slope_sd_inside_lme4_interval"]
        and correlation >= GOALS["sleepstudy_correlation_min"]
    )
    say(f"sleepstudy: {report['svi']}")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.fidelity", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller programme, fewer draws")
    parser.add_argument(
        "--output", help="results/<OUTPUT>.json (default fidelity, or fidelity_quick with --quick)"
    )
    args = parser.parse_args(argv)
    args.output = args.output or ("fidelity_quick" if args.quick else "fidelity")
    settings = QUICK if args.quick else FULL
    results: dict[str, Any] = {
        "benchmark": "fidelity",
        "quick": args.quick,
        "machine": machine(),
        "goals": GOALS,
    }
    sim = simulate(settings.programme, seed=settings.programme_seed)
    results["fidelity"], nuts, config = fidelity_vs_nuts(sim, settings)
    write_json(args.output, results)  # partial results survive a later failure
    results["sequential"] = sequential(sim, config, nuts, settings)
    write_json(args.output, results)
    results["calibration"] = calibration(settings)
    write_json(args.output, results)
    results["sleepstudy"] = sleepstudy(settings)
    path = write_json(args.output, results)
    say(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
