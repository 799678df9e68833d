"""Coverage of the smooth model's curves and patients over repeated simulations
(issue 16, part 3).

Each programme (model.simulate, seeds 0..N-1) is a wearable measure with a daily
cycle of two harmonics and an effect modifier that saturates with age
(``smooth_spec``). It is fitted twice with ``model.offline.fit_programme`` (SVI,
the defaults of ``efficacy fit``): with a spline of age and the daily cycle
(``efficacy fit --smooth age --daily-cycle 2``), and with age linear and no
cycle (``--covariates age``). Checked:

- the 90% band of the expected-effect curve against the truth
  (``true_effect_at``) at its 41 grid points, and of the daily cycle against
  ``true_daily_cycle`` at its 41 hours (target 86-94%);
- every patient's 90% interval against its true effect, smooth and linear, and
  the mean posterior sd of the patients' effects under each.

Grid points of one programme share a fit, so the se of the pooled coverage is
the cluster se (programmes as clusters, model.operating.rate_with_se).

Run ``python -m benchmarks.smooth --programmes 20``; results in
benchmarks/results/smooth_coverage.json (written after every programme).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.common import machine, say, write_json
from model.config import MeasureConfig
from model.offline import fit_programme
from model.operating import rate_with_se
from model.simulate import ProgrammeSpec, simulate, true_daily_cycle, true_effect_at
from model.smooth import add_smooth_terms

RHR = MeasureConfig(name="resting_heart_rate", unit="bpm", direction="lower", mcid=2.0)


def smooth_spec(num_patients: int = 300) -> ProgrammeSpec:
    """A wearable measure: a daily cycle (4 bpm, 1.5 bpm at 12 h) and a benefit
    that fades over ten years of age around 55 (A = 4 bpm, w = 6 years; patients' own spread 1.5 bpm)."""
    return ProgrammeSpec(
        num_patients=num_patients,
        num_cohorts=8,
        cohort_effect_sd=0.5,
        obs_per_patient=30,
        effect_sd=1.5,
        with_covariates=True,
        effect_saturation=4.0,
        saturation_age=55.0,
        saturation_width=6.0,
        daily_amplitudes=(4.0, 1.5),
    )


def one_programme(spec: ProgrammeSpec, seed: int) -> dict:
    """Curve, cycle and patient checks of one simulated programme."""
    sim = simulate(spec, seed)
    design = add_smooth_terms(sim.events, ("age",), harmonics=2)
    smooth, _ = fit_programme(design.events, RHR, seed=seed, smooth=design)
    linear, _ = fit_programme(sim.events, RHR, seed=seed)
    curve = smooth["curves"][0]
    truth = true_effect_at(spec, np.asarray(curve["grid"]))
    cycle = smooth["daily_cycle"]
    cycle_truth = true_daily_cycle(spec, np.asarray(cycle["hour"]))

    def covered(band: dict, values: np.ndarray) -> int:
        return int(
            np.sum((np.asarray(band["q05"]) <= values) & (values <= np.asarray(band["q95"])))
        )

    def patients(result: dict) -> tuple[int, float]:
        lows = np.array([p["effect"]["q05"] for p in result["patients"]])
        highs = np.array([p["effect"]["q95"] for p in result["patients"]])
        sds = np.array([p["effect"]["sd"] for p in result["patients"]])
        hits = (lows <= sim.truth.effect) & (sim.truth.effect <= highs)
        return int(hits.sum()), float(sds.mean())

    smooth_hits, smooth_sd = patients(smooth)
    linear_hits, linear_sd = patients(linear)
    return {
        "seed": seed,
        "curve_hits": covered(curve["effect"], truth),
        "curve_points": truth.size,
        "cycle_hits": covered(cycle, cycle_truth),
        "cycle_points": cycle_truth.size,
        "patients": spec.num_patients,
        "smooth_patient_hits": smooth_hits,
        "linear_patient_hits": linear_hits,
        "smooth_patient_sd": smooth_sd,
        "linear_patient_sd": linear_sd,
    }


def summarise(rows: list[dict]) -> dict:
    def pooled(hits: str, total: str) -> dict:
        rate, se, count = rate_with_se(
            np.array([r[hits] for r in rows]), np.array([r[total] for r in rows])
        )
        return {"rate": rate, "se": se, "n": count}

    return {
        "programmes": len(rows),
        "curve_coverage": pooled("curve_hits", "curve_points"),
        "cycle_coverage": pooled("cycle_hits", "cycle_points"),
        "smooth_patient_coverage": pooled("smooth_patient_hits", "patients"),
        "linear_patient_coverage": pooled("linear_patient_hits", "patients"),
        "patient_sd_ratio_smooth_to_linear": float(
            np.mean([r["smooth_patient_sd"] / r["linear_patient_sd"] for r in rows])
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--programmes", type=int, default=20)
    parser.add_argument("--patients", type=int, default=300)
    args = parser.parse_args()
    from streams.compilation_cache import enable_compilation_cache

    enable_compilation_cache(Path(tempfile.gettempdir()) / "efficacy-bench-smooth-cache")
    spec = smooth_spec(args.patients)
    rows = []
    for seed in range(args.programmes):
        rows.append(one_programme(spec, seed))
        say(f"programme {seed + 1}/{args.programmes}: {rows[-1]}")
        write_json(
            "smooth_coverage",
            {
                "machine": machine(),
                "spec": spec.model_dump(),
                "summary": summarise(rows),
                "rows": rows,
            },
        )
    say(str(summarise(rows)))


if __name__ == "__main__":
    main()
