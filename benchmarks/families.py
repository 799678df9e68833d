"""Coverage of patients' true effects for Bernoulli and Poisson measures (issue 16).

Over programmes simulated with seeds seed..seed+N-1 (model.simulate.simulate_family):
does a 90% interval of a patient's effect (the link scale: log odds ratio, log
rate ratio) cover the patient's true effect 90% of the time? Each programme is
fitted as ``efficacy fit --family`` fits it: collapsed Laplace likelihood,
full-rank SVI over θ (model.population, default SVIConfig), patient posteriors as
mixtures over draws of θ (model.family_scores). One fitter per family serves
every programme (same padded shapes: compiled once). The population effect's
interval coverage of the simulated μ_b is reported too (one per programme), and
per programme the coverage and the sample sd of the patients' true effects
(cohort deviations included) against the fitted τ_b (a programme whose data favour a small τ_b over-shrinks every
patient: exact inference does too, see benchmarks/README.md section 11).

Pooled patient coverage has the cluster (ratio-estimator) se of
model.operating.rate_with_se (a programme's patients share one fit).

Run ``python -m benchmarks.families --programmes 20``; progress on stderr,
results in benchmarks/results/families_coverage.json.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import jax
import numpy as np

from benchmarks.common import machine, say, write_json
from model.config import MeasureConfig, SVIConfig
from model.families import cell_stats
from model.family_scores import summarize_family_effects
from model.offline import model_config_for
from model.operating import rate_with_se
from model.population import PopulationFitter, pad_evidence
from model.simulate import ProgrammeSpec, simulate_family

LINK = {"bernoulli": "log_odds_ratio", "poisson": "log_rate_ratio"}


def family_spec(family: str, num_patients: int, obs: int) -> ProgrammeSpec:
    """The programme of each family (link scale): Bernoulli baseline risk ~0.38,
    odds ratio e^0.8; Poisson baseline rate e^0.5 per unit exposure, rate ratio e^-0.5."""
    common = {
        "num_patients": num_patients, "num_cohorts": 8, "obs_per_patient": obs,
        "correlation": -0.2, "baseline_fraction": 0.5,
    }  # fmt: skip
    if family == "bernoulli":
        return ProgrammeSpec(
            **common, intercept=-0.5, effect=0.8, intercept_sd=0.8, effect_sd=0.6,
            cohort_effect_sd=0.3,
        )  # fmt: skip
    return ProgrammeSpec(
        **common, intercept=0.5, effect=-0.5, intercept_sd=0.6, effect_sd=0.4,
        cohort_effect_sd=0.2,
    )  # fmt: skip


def run_family(family: str, args: argparse.Namespace) -> dict[str, Any]:
    spec = family_spec(family, args.patients, args.obs)
    measure = MeasureConfig(
        name="outcome", unit="", mcid=0.2, family=family, effect_scale=LINK[family]
    )
    fitter = None
    hits, totals, population_hits, widths, seconds = [], [], [], [], []
    per_programme = []
    for seed in range(args.seed, args.seed + args.programmes):
        started = time.perf_counter()
        sim = simulate_family(spec, family, seed, offsets=family == "poisson")
        events = sim.events
        config = model_config_for(events, time_trend=False, cohort_level=True, family=family)
        cells = cell_stats(
            events.num_patients, events.patient, events.exposure, events.outcome, family,
            events.offset,
        )  # fmt: skip
        evidence = pad_evidence(
            _stats(cells),
            events.cohort_of_patient,
            events.num_cohorts,
        )
        fitter = fitter or PopulationFitter(config, SVIConfig())
        keys = jax.random.split(jax.random.PRNGKey(seed), 3)
        state = fitter.init(keys[0], evidence)
        state, info = fitter.update(state, evidence, keys[1])
        draws = fitter.draws(state, keys[2])
        summary = summarize_family_effects(
            draws, cells, events.cohort_of_patient, evidence.num_cohorts, measure, config
        )
        truth = sim.truth.effect
        covered = (summary.lower <= truth) & (truth <= summary.upper)
        hits.append(int(covered.sum()))
        totals.append(int(truth.size))
        widths.append(float(np.median(summary.upper - summary.lower)))
        mu_b = np.asarray(draws.mu)[:, 1]
        low, high = np.quantile(mu_b, [0.05, 0.95])
        population_hits.append(bool(low <= spec.effect <= high))
        seconds.append(time.perf_counter() - started)
        per_programme.append(
            {
                "seed": seed,
                "coverage": float(covered.mean()),
                "effect_sd_patients_true": float(np.std(truth)),
                "effect_sd_patients_fit": float(np.asarray(draws.tau)[:, 1].mean()),
            }
        )
        say(
            f"{family} seed {seed}: coverage {covered.mean():.3f}, population "
            f"{'covered' if population_hits[-1] else 'missed'}, converged {info.converged}, "
            f"{seconds[-1]:.1f} s"
        )
    rate, se, count = rate_with_se(np.array(hits), np.array(totals))
    return {
        "spec": spec.model_dump(),
        "patient_coverage": {"rate": rate, "se": se, "patients": count},
        "population_coverage": {
            "hits": int(sum(population_hits)),
            "programmes": len(population_hits),
        },
        "median_interval_width": float(np.median(widths)),
        "seconds_per_programme_median": float(np.median(seconds)),
        "seconds_first_programme": float(seconds[0]),
        "programmes": per_programme,
    }


def _stats(cells: np.ndarray):
    """The cell statistics in the PatientStats the evidence is padded from."""
    from model.evidence import gram_stats

    return gram_stats(cells, np.zeros(cells.shape[0]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--programmes", type=int, default=20, help="programmes per family")
    parser.add_argument("--seed", type=int, default=0, help="first seed")
    parser.add_argument("--patients", type=int, default=100, help="patients per programme")
    parser.add_argument("--obs", type=int, default=40, help="readings per patient")
    args = parser.parse_args(argv)
    jax.config.update("jax_enable_x64", True)
    results = {
        "command": "python -m benchmarks.families " + " ".join(argv or []),
        "machine": machine(),
        "programmes": args.programmes,
        "patients": args.patients,
        "readings_per_patient": args.obs,
        "families": {family: run_family(family, args) for family in ("bernoulli", "poisson")},
    }
    path = write_json("families_coverage", results)
    say(f"wrote {path}")
    for family, row in results["families"].items():
        cover = row["patient_coverage"]
        say(f"{family}: patients' 90% coverage {cover['rate']:.3f} ± {cover['se']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
