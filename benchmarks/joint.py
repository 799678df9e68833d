"""The joint model of several measures (model.joint) against per-measure fits
(issue 16): accuracy on simulated programmes, and the cost of a warm update.

``accuracy``: programmes simulated with seeds seed..seed+N-1
(model.simulate.simulate_joint), 3 measures, patients with unequal numbers of
readings of each; each fitted jointly (model.joint, default SVIConfig) and
measure by measure (model.population + model.scores, the model of ``efficacy
fit``, no cohort level, no trend). Per measure: RMSE of the patients' posterior
mean effects against the true ones (joint / per-measure ratio, per programme,
then averaged with its se over programmes), and the 90% intervals' coverage of
the true effects (pooled, cluster se of model.operating.rate_with_se). Run once
with the effects correlating 0.7 and once with 0.

``cost``: one warm update (SVIConfig.update_steps steps, update_particles) of
q(θ) at P patients × 3 measures: the joint fit against the three measures'
single fits run one after the other, medians over repeats after a compiling
call; the ratio is the number to read (the machine is shared). ``--cohorts G``
(G > 0): patients spread over G cohorts and every model with a cohort level.

``--effect-correlation-concentration η`` (accuracy, exact): the LKJ η of
the effects' correlation (PriorConfig; results then in ``*_eta<η>.json``).
``--spike-weight π --spike-concentration η_s``: the weight and η of the spike
at independence in that prior, π LKJ(η_s) + (1 − π) LKJ(η) (PriorConfig;
results in ``*_spike<π>.json``, ``*_spike_eta<η_s>.json``; ``--spike-weight 0``
is the plain LKJ).

``exact``: on programmes of ``accuracy`` (correlation 0 by default), the
joint and the per-measure models each with θ by NUTS on its collapsed
likelihood (θ only: the exact posterior up to Monte Carlo error) and by SVI,
the patients' posteriors by the same exact mixture over either's draws: RMSE
ratio and coverage per measure, by NUTS and by SVI. It tells the models apart
from their approximations q(θ).

Run ``python -m benchmarks.joint accuracy --programmes 6`` and
``python -m benchmarks.joint cost --patients 100000``; progress on stderr,
results in benchmarks/results/joint_accuracy.json and joint_cost.json.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import jax
import numpy as np

from benchmarks.common import machine, median, say, write_json
from model.config import MeasureConfig, PriorConfig, SVIConfig
from model.evidence import events_stats
from model.joint import (
    describe_common_factor,
    joint_config_for,
    joint_fitter,
    joint_grams,
    joint_patients,
    pad_joint,
)
from model.operating import rate_with_se
from model.population import PopulationFitter, pad_evidence
from model.scores import summarize_effects
from model.simulate import joint_design, simulate_joint

MEASURE = MeasureConfig(name="m", unit="", mcid=0.0)


def programme(patients: int, correlation: float, seed: int, low: int = 2, high: int = 12):
    """A simulated programme: each patient's readings of each measure uniform in
    [low, high] (the measures unequally informative per patient)."""
    rng = np.random.default_rng([seed, 1])
    readings = rng.integers(low, high + 1, (patients, 3))
    return simulate_joint(readings, **joint_design(), effect_correlation=correlation, seed=seed)


def accuracy(args: argparse.Namespace) -> dict[str, Any]:
    svi_config = SVIConfig()
    rows = []
    for correlation in (0.7, 0.0):
        joint_fit = separate_fit = None
        per_programme = []
        for seed in range(args.seed, args.seed + args.programmes):
            started = time.perf_counter()
            events, truth = programme(args.patients, correlation, seed)
            config = joint_config_for(events, priors=_priors(args))
            gram = joint_grams(events, config)
            key = jax.random.PRNGKey(seed)
            keys = jax.random.split(key, 3)
            joint_fit = joint_fit or joint_fitter(config, svi_config)
            evidence = pad_joint(gram)
            state, _ = joint_fit.update(joint_fit.init(keys[0], evidence), evidence, keys[1])
            draws = joint_fit.draws(state, keys[2])
            patients = joint_patients(draws, gram, config)
            scale = np.array([c.standardization.effect_to_raw(1.0) for c in config.measures])
            joint_mean = patients.effect_mean * scale
            joint_lower, joint_upper = patients.effect_lower * scale, patients.effect_upper * scale

            separate = []
            for m, measure_config in enumerate(config.measures):
                separate_fit = separate_fit or PopulationFitter(
                    measure_config.structure, svi_config
                )
                stats = events_stats(events[m], measure_config)
                cohort = np.zeros(args.patients, dtype=np.int32)
                single = pad_evidence(stats, cohort, 1)
                fitted, _ = separate_fit.update(separate_fit.init(keys[0], single), single, keys[1])
                separate.append(
                    summarize_effects(
                        separate_fit.draws(fitted, keys[2]),
                        stats.gram,
                        cohort,
                        single.num_cohorts,
                        MEASURE,
                        measure_config,
                    )
                )
            record = {"seed": seed, "seconds": round(time.perf_counter() - started, 1)}
            for m in range(3):
                sep = separate[m]
                record[f"measure{m}"] = {
                    "rmse_joint": float(np.sqrt(np.mean((joint_mean[:, m] - truth[:, m]) ** 2))),
                    "rmse_separate": float(np.sqrt(np.mean((sep.mean - truth[:, m]) ** 2))),
                    "covered_joint": int(
                        np.sum(
                            (joint_lower[:, m] <= truth[:, m]) & (truth[:, m] <= joint_upper[:, m])
                        )
                    ),
                    "covered_separate": int(
                        np.sum((sep.lower <= truth[:, m]) & (truth[:, m] <= sep.upper))
                    ),
                    "width_joint": float(np.median(joint_upper[:, m] - joint_lower[:, m])),
                    "width_separate": float(np.median(sep.upper - sep.lower)),
                }
            record["factor"] = _factor_against_truth(draws, correlation)
            per_programme.append(record)
            say(f"correlation {correlation} seed {seed}: {record}")
        summary = {}
        for m in range(3):
            parts = [r[f"measure{m}"] for r in per_programme]
            summary[f"measure{m}"] = {
                **_compare(parts, args.patients),
                "width_ratio_median": float(
                    np.median([p["width_joint"] / p["width_separate"] for p in parts])
                ),
            }
        factors = [r["factor"] for r in per_programme]
        summary["factor"] = {
            "true_variance_share": factors[0]["true_variance_share"],
            "variance_share_mean": float(np.mean([f["variance_share"]["mean"] for f in factors])),
            "variance_share_covered": int(sum(f["variance_share_covered"] for f in factors)),
            "loadings_covered": int(sum(f["loadings_covered"] for f in factors)),
            "programmes": len(factors),
        }
        rows.append({"correlation": correlation, "summary": summary, "programmes": per_programme})
    return {"patients": args.patients, "rows": rows}


def _factor_against_truth(draws, correlation: float) -> dict[str, Any]:
    """The effects' common factor (model.joint.describe_common_factor) against the
    simulation's: three effects correlating r pairwise have λ₁ = 1 + 2r, so the
    true variance share is (1 + 2r)/3 and every loading √that share. At r = 0 the
    share's truth, 1/3, is its lower bound (λ₁ ≥ 1 for any correlation), so no
    interval covers it there: the mean share says how far it stays from it."""
    factor = describe_common_factor(draws, np.ones(3))
    share = (1.0 + 2.0 * correlation) / 3.0
    lows, highs = factor["loadings"]["q05"], factor["loadings"]["q95"]
    return {
        "true_variance_share": share,
        "variance_share": factor["variance_share"],
        "variance_share_covered": bool(
            factor["variance_share"]["q05"] <= share <= factor["variance_share"]["q95"]
        ),
        "loadings": factor["loadings"],
        "loadings_covered": int(
            sum(low <= np.sqrt(share) <= high for low, high in zip(lows, highs, strict=True))
        ),
    }


def cost(args: argparse.Namespace) -> dict[str, Any]:
    svi_config = SVIConfig()
    events, _ = programme(args.patients, 0.7, args.seed, low=4, high=8)
    num_cohorts = max(args.cohorts, 1)
    cohort = np.arange(args.patients, dtype=np.int32) % num_cohorts
    config = joint_config_for(events, cohort_level=args.cohorts > 0)
    gram = joint_grams(events, config)
    key = jax.random.PRNGKey(args.seed)
    joint_fit = joint_fitter(config, svi_config)
    evidence = pad_joint(gram, cohort, num_cohorts)
    # A warm state: the step counter past the fresh fit, so update runs update_steps.
    joint_state = joint_fit.init(key, evidence)._replace(total_steps=1)
    separate_fit = PopulationFitter(config.measures[0].structure, svi_config)
    singles = [
        pad_evidence(events_stats(events[m], config.measures[m]), cohort, num_cohorts)
        for m in range(3)
    ]
    states = [separate_fit.init(key, single)._replace(total_steps=1) for single in singles]

    def joint_update() -> float:
        started = time.perf_counter()
        state, _ = joint_fit.update(joint_state, evidence, key)
        jax.block_until_ready(state.svi_state)
        return time.perf_counter() - started

    def separate_updates() -> float:
        started = time.perf_counter()
        for state, single in zip(states, singles, strict=True):
            new, _ = separate_fit.update(state, single, key)
            jax.block_until_ready(new.svi_state)
        return time.perf_counter() - started

    say("compiling")
    first_joint, first_separate = joint_update(), separate_updates()
    joint_times, separate_times = [], []
    for repeat in range(args.repeats):
        joint_times.append(joint_update())
        separate_times.append(separate_updates())
        say(f"repeat {repeat}: joint {joint_times[-1]:.2f} s, separate {separate_times[-1]:.2f} s")
    return {
        "patients": args.patients,
        "cohorts": args.cohorts,
        "padded_patients": int(evidence.gram.shape[0]),
        "steps": svi_config.update_steps,
        "first_call_s": {"joint": first_joint, "separate": first_separate},
        "joint_s": joint_times,
        "separate_s": separate_times,
        "joint_median_s": median(joint_times),
        "separate_median_s": median(separate_times),
        "ratio": median(joint_times) / median(separate_times),
    }


def _nuts_draws(model, values: dict, seed: int, *model_args) -> dict[str, jax.Array]:
    """NUTS on a collapsed model over θ alone (500 warm-up, 1000 draws)."""
    from numpyro.infer import MCMC, NUTS, init_to_value

    kernel = NUTS(model, init_strategy=init_to_value(values=values))
    mcmc = MCMC(kernel, num_warmup=500, num_samples=1000, progress_bar=False)
    mcmc.run(jax.random.PRNGKey(seed), *model_args)
    return mcmc.get_samples()


def exact(args: argparse.Namespace) -> dict[str, Any]:
    """Joint against per-measure, each model's θ by NUTS (the exact posterior up
    to Monte Carlo error) and by SVI; patients by the same exact mixture over
    either's draws. Tells the models apart from their approximations."""
    from model.joint import fit_joint, initial_values, joint_from_sites, joint_model
    from model.population import _initial_values, hyper_from_sites, hyper_model

    rows = []
    for seed in args.seeds:
        started = time.perf_counter()
        events, truth = programme(args.patients, args.correlation, seed)
        config = joint_config_for(events, priors=_priors(args))
        gram = joint_grams(events, config)
        evidence = pad_joint(gram)
        sites = _nuts_draws(
            joint_model,
            initial_values(config),
            seed,
            evidence.gram,
            evidence.cohort,
            evidence.num_cohorts,
            config.structure,
        )
        joint = {
            "nuts": joint_patients(joint_from_sites(sites, config), gram, config),
            "svi": joint_patients(fit_joint(gram, config, seed=seed)[0], gram, config),
        }
        record: dict[str, Any] = {"seed": seed}
        for m, measure_config in enumerate(config.measures):
            structure = measure_config.structure
            stats = events_stats(events[m], measure_config)
            cohort = np.zeros(args.patients, dtype=np.int32)
            single = pad_evidence(stats, cohort, 1)
            nuts_sites = _nuts_draws(
                hyper_model,
                _initial_values(structure),
                seed,
                single.gram,
                single.cohort,
                single.num_cohorts,
                structure,
            )
            fitter = PopulationFitter(structure, SVIConfig())
            keys = jax.random.split(jax.random.PRNGKey(seed), 3)
            fitted, _ = fitter.update(fitter.init(keys[0], single), single, keys[1])
            separate = {
                "nuts": hyper_from_sites(nuts_sites, structure),
                "svi": fitter.draws(fitted, keys[2]),
            }
            scale = measure_config.standardization.effect_to_raw(1.0)
            true = truth[:, m]
            record[f"measure{m}"] = {}
            for method in ("nuts", "svi"):
                mine = joint[method]
                summary = summarize_effects(
                    separate[method], stats.gram, cohort, single.num_cohorts, MEASURE,
                    measure_config,
                )  # fmt: skip
                lower, upper = mine.effect_lower[:, m] * scale, mine.effect_upper[:, m] * scale
                record[f"measure{m}"][method] = {
                    "rmse_joint": _rmse(mine.effect_mean[:, m] * scale, true),
                    "rmse_separate": _rmse(summary.mean, true),
                    "covered_joint": int(np.sum((lower <= true) & (true <= upper))),
                    "covered_separate": int(
                        np.sum((summary.lower <= true) & (true <= summary.upper))
                    ),
                }
        record["seconds"] = round(time.perf_counter() - started, 1)
        rows.append(record)
        say(f"seed {seed}: {record}")
    summary = {}
    for m in range(3):
        summary[f"measure{m}"] = {}
        for method in ("nuts", "svi"):
            parts = [r[f"measure{m}"][method] for r in rows]
            summary[f"measure{m}"][method] = _compare(parts, args.patients)
    return {
        "patients": args.patients,
        "correlation": args.correlation,
        "summary": summary,
        "rows": rows,
    }


def _compare(parts: list[dict[str, Any]], patients: int) -> dict[str, Any]:
    """One measure over programmes: the joint / per-measure RMSE ratio (mean and
    se over programmes) and each model's pooled coverage with its cluster se."""
    ratios = np.array([p["rmse_joint"] / p["rmse_separate"] for p in parts])
    totals = np.full(len(parts), patients)
    return {
        "rmse_ratio_mean": float(ratios.mean()),
        "rmse_ratio_se": float(ratios.std(ddof=1) / np.sqrt(ratios.size)),
        "coverage_joint": rate_with_se(np.array([p["covered_joint"] for p in parts]), totals)[:2],
        "coverage_separate": rate_with_se(np.array([p["covered_separate"] for p in parts]), totals)[
            :2
        ],
    }


def _priors(args: argparse.Namespace) -> PriorConfig:
    return PriorConfig(
        effect_correlation_concentration=args.effect_correlation_concentration,
        effect_correlation_spike_weight=args.spike_weight,
        effect_correlation_spike_concentration=args.spike_concentration,
    )


def _rmse(estimate: np.ndarray, truth: np.ndarray) -> float:
    return float(np.sqrt(np.mean((np.asarray(estimate) - truth) ** 2)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    first = sub.add_parser("accuracy")
    first.add_argument("--programmes", type=int, default=6)
    first.add_argument("--patients", type=int, default=200)
    first.add_argument("--seed", type=int, default=0)
    second = sub.add_parser("cost")
    second.add_argument("--patients", type=int, default=100_000)
    second.add_argument("--repeats", type=int, default=3)
    second.add_argument("--cohorts", type=int, default=0)
    second.add_argument("--seed", type=int, default=0)
    third = sub.add_parser("exact")
    third.add_argument("--seeds", type=int, nargs="+", default=list(range(12)))
    third.add_argument("--patients", type=int, default=200)
    third.add_argument("--correlation", type=float, default=0.0)
    for each in (first, third):
        each.add_argument(
            "--effect-correlation-concentration",
            type=float,
            default=PriorConfig().effect_correlation_concentration,
            help="η of the LKJ prior on the effects' correlation (PriorConfig)",
        )
        each.add_argument(
            "--spike-weight",
            type=float,
            default=PriorConfig().effect_correlation_spike_weight,
            help="weight of the spike at independence in that prior (PriorConfig)",
        )
        each.add_argument(
            "--spike-concentration",
            type=float,
            default=PriorConfig().effect_correlation_spike_concentration,
            help="η of the spike's LKJ (PriorConfig)",
        )
    args = parser.parse_args()
    started = time.perf_counter()
    commands = {"accuracy": accuracy, "cost": cost, "exact": exact}
    result = commands[args.command](args)
    result.update(machine=machine(), seconds=round(time.perf_counter() - started, 1))
    name = f"joint_{args.command.replace('-', '_')}"
    if args.command == "cost" and args.cohorts:
        name += "_cohorts"
    defaults = PriorConfig()
    eta = getattr(args, "effect_correlation_concentration", None)
    if eta is not None and eta != defaults.effect_correlation_concentration:
        name += f"_eta{eta:g}"
    spike = getattr(args, "spike_weight", defaults.effect_correlation_spike_weight)
    if spike != defaults.effect_correlation_spike_weight:
        name += f"_spike{spike:g}"
    spike_eta = getattr(
        args, "spike_concentration", defaults.effect_correlation_spike_concentration
    )
    if spike and spike_eta != defaults.effect_correlation_spike_concentration:
        name += f"_spike_eta{spike_eta:g}"
    path = write_json(name, result)
    say(f"wrote {path}")


if __name__ == "__main__":
    main()
