"""Non-linear dependencies by basis expansion (model.smooth): the spline basis
and its penalty against numerical integration, the Fourier terms, the prior
of the spline weights, and (slow) the fitted curves against the simulation's
truth, against numpyro NUTS on the same basis model, and structure selection
between the straight line and the curve."""

from __future__ import annotations

import numpy as np
import pytest
from numpyro import handlers

from model.config import MeasureConfig, ModelConfig
from model.covariates import column_blocks
from model.offline import fit_programme, model_config_for
from model.simulate import ProgrammeSpec, simulate, true_daily_cycle, true_effect_at
from model.smooth import (
    SplineBasis,
    add_smooth_terms,
    fourier_columns,
    fourier_design,
    hour_of_day,
    roughness_penalty,
    sample_coefficients,
    spline_blocks,
)

RHR = MeasureConfig(name="resting_heart_rate", unit="bpm", direction="lower", mcid=2.0)
BASIS = SplineBasis(covariate="age", knots=(-1.0, -0.2, 0.5, 1.2), boundary=(-2.5, 2.6))


def _second_derivative_energy(values: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """∫ f''² by central differences and the trapezoid rule on a fine grid:
    a reference independent of the B-spline algebra (f: columns of values)."""
    step = grid[1] - grid[0]
    second = (values[2:] - 2.0 * values[1:-1] + values[:-2]) / step**2
    return np.trapezoid(second**2, dx=step, axis=0)


def test_penalty_is_the_integral_of_squared_second_derivatives():
    """Ω (Simpson, exact for piecewise-linear B'') equals ∫ B_k'' B_l'' by finite
    differences on 20 001 points (their error is O(h²) ≈ 1e-7 relative away
    from the knots' kinks; the kinks cost ~1e-4 relative)."""
    from scipy.interpolate import BSpline

    vector = np.concatenate([[-2.5] * 4, BASIS.knots, [2.6] * 4])
    grid = np.linspace(-2.5, 2.6, 20001)
    basis = BSpline.design_matrix(grid, vector, 3).toarray()
    step = grid[1] - grid[0]
    second = (basis[2:] - 2.0 * basis[1:-1] + basis[:-2]) / step**2
    numeric = np.trapezoid(second[:, :, None] * second[:, None, :], dx=step, axis=0)
    exact = roughness_penalty(BASIS.knots, BASIS.boundary)
    np.testing.assert_allclose(exact, numeric, rtol=2e-3, atol=2e-3 * np.abs(exact).max())


def test_spline_columns_turn_the_penalty_into_the_sum_of_squared_weights():
    """For any weights u, ∫ (Z u)''² = Σ u² (the mixed-model form of the penalty),
    and the columns have no straight-line part left to penalise: a line's
    ∫ f''² is 0 and Z spans no line (the design [1, v, Z] has full rank)."""
    grid = np.linspace(*BASIS.boundary, 20001)
    design = BASIS.design(grid)
    assert design.shape == (grid.size, len(BASIS.knots) + 2)
    rng = np.random.default_rng(0)
    weights = rng.standard_normal((design.shape[1], 5))
    energy = _second_derivative_energy(design @ weights, grid)
    np.testing.assert_allclose(energy, np.sum(weights**2, axis=0), rtol=2e-3)
    full = np.column_stack([np.ones_like(grid), grid, design])
    assert np.linalg.matrix_rank(full) == full.shape[1]


def test_spline_is_held_at_its_boundary_and_knots_are_validated():
    inside = BASIS.design(np.array([-2.5, 2.6]))
    outside = BASIS.design(np.array([-9.0, 9.0]))
    np.testing.assert_allclose(outside, inside)
    with pytest.raises(ValueError, match="knots must increase"):
        SplineBasis(covariate="age", knots=(0.5, 0.1), boundary=(-1.0, 1.0))
    with pytest.raises(ValueError, match="too few for a spline"):
        SplineBasis.from_values("age", np.array([0.0, 1.0, 1.0, 2.0]), num_knots=4)
    quantile = SplineBasis.from_values("age", np.linspace(-2.0, 2.0, 101), num_knots=3)
    np.testing.assert_allclose(quantile.knots, [-1.0, 0.0, 1.0])
    assert quantile.boundary == (-2.0, 2.0)


def test_fourier_terms_of_the_hour_of_day():
    hours = np.array([0.0, 6.0, 12.0, 18.0])
    design = fourier_design(hours, 2)
    assert fourier_columns("hour", 2) == ("hour:cos1", "hour:sin1", "hour:cos2", "hour:sin2")
    np.testing.assert_allclose(design[:, 0], [1, 0, -1, 0], atol=1e-12)  # cos(2π h/24)
    np.testing.assert_allclose(design[:, 1], [0, 1, 0, -1], atol=1e-12)  # sin(2π h/24)
    np.testing.assert_allclose(design[:, 2], [1, -1, 1, -1], atol=1e-12)  # cos(4π h/24)
    np.testing.assert_allclose(hour_of_day(np.array([3.25, 10.5, -0.25])), [6.0, 12.0, 18.0])


def test_spline_columns_form_their_own_block_for_selection():
    columns = ("age", "group=B", "age:s1", "age:s2", "bmi", "bmi:s1")
    assert spline_blocks(columns) == {"age": (2, 3), "bmi": (5,)}
    assert column_blocks(columns) == {
        "age": (0,), "group": (1,), "age:smooth": (2, 3), "bmi": (4,), "bmi:smooth": (5,),
    }  # fmt: skip


def test_spline_weights_have_a_learned_scale_and_other_coefficients_do_not():
    """The prior of B, by hand: ordinary columns N(0, covariate_sd²); spline
    columns B = λ z with z ~ N(0, 1), i.e. N(0, λ²) given λ ~ HalfNormal(
    smooth_scale), one λ per row (intercept, effect) and smooth covariate."""
    from scipy import stats

    config = ModelConfig(covariates=("age", "group=B", "age:s1", "age:s2"))
    site = np.array([[0.3, -0.2, 0.5, -0.1], [0.1, 0.4, -0.7, 0.2]])
    smooth_sd = np.array([[0.4], [0.9]])
    substituted = handlers.substitute(
        handlers.seed(lambda: sample_coefficients(config), 0),
        data={"coef": site, "smooth_sd": smooth_sd},
    )
    trace = handlers.trace(substituted).get_trace()
    log_p = sum(float(s["fn"].log_prob(s["value"]).sum()) for s in trace.values())
    expected = stats.norm().logpdf(site).sum() + stats.halfnorm().logpdf(smooth_sd).sum()
    assert log_p == pytest.approx(expected, rel=1e-6)
    coef = np.asarray(substituted())
    np.testing.assert_allclose(coef[:, :2], site[:, :2])
    np.testing.assert_allclose(coef[:, 2:], site[:, 2:] * smooth_sd)


def test_smooth_terms_are_added_as_columns():
    spec = ProgrammeSpec(num_patients=40, num_cohorts=2, obs_per_patient=5, with_covariates=True)
    events = simulate(spec, seed=0).events
    design = add_smooth_terms(events, ("age",), harmonics=1, cycle_column="clock")
    assert design.events.covariate_names == ("age", *design.splines[0].columns)
    assert design.events.time_covariate_names == ("clock:cos1", "clock:sin1")
    np.testing.assert_allclose(
        design.events.time_covariates, fourier_design(hour_of_day(events.time), 1)
    )
    config = model_config_for(design.events, time_trend=True, cohort_level=False)
    # the spline columns are centred but keep their scale (Σ u² = ∫ f''²)
    assert config.standardization.covariate_scale[1:] == (1.0,) * 6
    with pytest.raises(ValueError, match="not a numeric patient covariate"):
        add_smooth_terms(events, ("weight",))


# A wearable measure whose benefit fades over ten years of age around 55 and
# whose readings follow the clock (benchmarks/smooth.py runs it over seeds).
WEARABLE = ProgrammeSpec(
    num_patients=300,
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


@pytest.mark.slow
def test_smooth_fit_recovers_the_curves_and_narrows_the_patients():
    """One programme against the simulation's truth. The curve's 90% band covers
    the true expected effect on ≥ 75% of its 41 grid points (one programme:
    grid points share one fit, so the coverage of a single band swings widely;
    the 86-94% target is benchmarks/smooth.py's over many programmes, where
    one programme in ten covers less than 83%: this seed is a fixed one) and the
    daily cycle's mean is within 0.6 bpm of the truth everywhere (its amplitude
    is 5.5 bpm; the sd of each point is ≈ 0.2 bpm with 6 000 readings of sd 4).
    The patients' effects: 90% intervals cover 80-98% of the true effects (the
    patients of one programme share its fit, so the coverage varies between
    programmes by more than the binomial 2.1% of 200 patients: sd 2.3% at 300
    patients over the benchmark's 40 programmes, ≈ 2.7% at 200; ± 3 of those
    around 90%, the low end rounded down) and are narrower on average than the
    linear model's, which leaves the curve's structure in the patients' spread."""
    spec = WEARABLE.model_copy(update={"num_patients": 200})
    sim = simulate(spec, seed=3)
    design = add_smooth_terms(sim.events, ("age",), harmonics=2)
    smooth, _ = fit_programme(design.events, RHR, seed=1, smooth=design)
    linear, _ = fit_programme(sim.events, RHR, seed=1)

    curve = smooth["curves"][0]
    truth = true_effect_at(spec, np.asarray(curve["grid"]))
    low, high = np.asarray(curve["effect"]["q05"]), np.asarray(curve["effect"]["q95"])
    coverage = np.mean((low <= truth) & (truth <= high))
    assert coverage >= 0.75, f"curve band covers {coverage:.2f} of the grid"
    cycle = smooth["daily_cycle"]
    cycle_error = np.abs(
        np.asarray(cycle["mean"]) - true_daily_cycle(spec, np.asarray(cycle["hour"]))
    )
    assert cycle_error.max() < 0.6, f"daily cycle off by up to {cycle_error.max():.2f} bpm"

    def patients(result):
        low = np.array([p["effect"]["q05"] for p in result["patients"]])
        high = np.array([p["effect"]["q95"] for p in result["patients"]])
        sd = np.array([p["effect"]["sd"] for p in result["patients"]])
        return np.mean((low <= sim.truth.effect) & (sim.truth.effect <= high)), sd.mean()

    smooth_coverage, smooth_sd = patients(smooth)
    _, linear_sd = patients(linear)
    assert 0.80 <= smooth_coverage <= 0.98, f"patient coverage {smooth_coverage:.3f}"
    assert smooth_sd < 0.97 * linear_sd, f"patient sd {smooth_sd:.3f} against {linear_sd:.3f}"


@pytest.mark.slow
def test_smooth_fit_matches_nuts_on_the_same_basis_model():
    """Collapsed SVI against NUTS on the full model (every patient effect
    sampled, 1 chain, 500 warm-up and 500 draws) with the same spline and
    Fourier columns and the same priors, the smoothing scale λ included, on a
    small programme (80 patients). Tolerances by NUTS's Monte Carlo error at
    500 draws (ESS ≳ 150 for the curve: its mean's MC sd ≤ 0.08 posterior sd,
    an sd's ≈ 6%): the expected-effect curve and the daily cycle within 0.25
    NUTS sd of NUTS's at every grid point, their 90% bands' widths 0.75-1.3 of
    NUTS's at the median point; patients: median |mean diff| / NUTS sd ≤ 0.12
    and median sd ratio 0.9-1.1 (test_covariates_fidelity's, loosened for 500
    draws)."""
    spec = WEARABLE.model_copy(update={"num_patients": 80, "num_cohorts": 4, "obs_per_patient": 20})
    sim = simulate(spec, seed=5)
    design = add_smooth_terms(sim.events, ("age",), harmonics=1, num_knots=3)
    svi, _ = fit_programme(design.events, RHR, seed=2, smooth=design)
    nuts, _ = fit_programme(
        design.events, RHR, method="nuts", seed=3, smooth=design,
        nuts_options={"num_warmup": 500, "num_samples": 500, "centred_patients": True},
    )  # fmt: skip
    assert nuts["diagnostics"]["divergences"] <= 5

    def compare(approx: dict, reference: dict, what: str) -> None:
        ref_mean, ref_low, ref_high = (np.asarray(reference[k]) for k in ("mean", "q05", "q95"))
        ref_sd = (ref_high - ref_low) / (2 * 1.645)
        error = np.abs(np.asarray(approx["mean"]) - ref_mean) / ref_sd
        width = (np.asarray(approx["q95"]) - np.asarray(approx["q05"])) / (ref_high - ref_low)
        assert error.max() <= 0.25, f"{what}: mean up to {error.max():.3f} NUTS sd from NUTS's"
        assert 0.75 <= np.median(width) <= 1.3, f"{what}: band width ratio {np.median(width):.3f}"

    compare(svi["curves"][0]["effect"], nuts["curves"][0]["effect"], "effect by age")
    compare(svi["daily_cycle"], nuts["daily_cycle"], "daily cycle")
    svi_mean = np.array([p["effect"]["mean"] for p in svi["patients"]])
    svi_sd = np.array([p["effect"]["sd"] for p in svi["patients"]])
    nuts_mean = np.array([p["effect"]["mean"] for p in nuts["patients"]])
    nuts_sd = np.array([p["effect"]["sd"] for p in nuts["patients"]])
    median_error = np.median(np.abs(svi_mean - nuts_mean) / nuts_sd)
    median_ratio = np.median(svi_sd / nuts_sd)
    assert median_error <= 0.12, f"median patient |mean diff| / NUTS sd {median_error:.3f}"
    assert 0.9 <= median_ratio <= 1.1, f"median patient sd ratio {median_ratio:.3f}"


@pytest.mark.slow
@pytest.mark.parametrize(("saturation", "expected"), [(4.0, "smooth"), (0.0, "linear")])
def test_selection_picks_the_curve_only_when_the_truth_bends(saturation, expected):
    """5-fold elpd over held-out patients (model.selection) between the straight
    line (``partial+x:age``) and the curve (``partial+x:age+x:age:smooth``): the
    curve must beat the line by 2 se of the paired difference to be chosen. On
    the saturating truth it is; on a linear truth (0.15 bpm per year, the same
    spread) the line is kept."""
    from model.evidence import events_stats
    from model.selection import select_structure

    spec = WEARABLE.model_copy(
        update={
            "num_patients": 240,
            "daily_amplitudes": (),
            "effect_saturation": saturation,
            "effect_per_year": 0.0 if saturation else 0.15,
        }
    )
    sim = simulate(spec, seed=7)
    events = add_smooth_terms(sim.events, ("age",)).events
    config = model_config_for(events, time_trend=True, cohort_level=False)
    stats = events_stats(events, config)
    line, curve = "partial+x:age", "partial+x:age+x:age:smooth"
    selection = select_structure(
        lambda _config: stats,
        config,
        seed=1,
        only=["partial", line, curve],
        covariates=config.standardization.covariates(events.covariates),
        covariate_blocks=column_blocks(config.covariates),
    )
    assert selection["choice"] == (curve if expected == "smooth" else line), selection["table"]


def _write_wearable_csv(path, spec: ProgrammeSpec, seed: int) -> None:
    """A programme as the CSV a user would bring: day (fractional: the hour of
    day is its fraction), a separate clock column, age per patient."""
    import csv

    events = simulate(spec, seed).events
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["patient", "clinic", "day", "clock", "dose", "rhr", "age", "group"])
        for row, i in enumerate(events.patient):
            writer.writerow([
                f"p{i:03d}", f"c{events.cohort_of_patient[i]}", f"{events.time[row]:.5f}",
                f"{hour_of_day(events.time[row]):.4f}", f"{events.exposure[row]:.4f}",
                f"{events.outcome[row]:.4f}", f"{events.covariates[i, 0]:.2f}",
                "B" if i % 2 else "A",
            ])  # fmt: skip


def test_efficacy_fit_with_smooth_and_daily_cycle(tmp_path):
    """`efficacy fit --smooth age --daily-cycle 2 --time-of-day clock` on a small
    CSV: the JSON carries the age curve and the daily cycle (41 grid points,
    mean inside its 90% band), the spline columns among the coefficients, and
    the command prints both curves. The cycle's peak is near the true one
    (16 h; the 41-point grid is 0.6 h apart, the posterior of the phase with
    1 200 readings of sd 4 against amplitude 4 a few tenths of an hour)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    spec = WEARABLE.model_copy(update={"num_patients": 60, "num_cohorts": 4, "obs_per_patient": 20})
    path = tmp_path / "wearable.csv"
    _write_wearable_csv(path, spec, seed=2)
    output = tmp_path / "fit.json"
    repo = Path(__file__).resolve().parent.parent
    base = [sys.executable, "-m", "cli.main", "fit", "--input", str(path), "--patient", "patient",
            "--exposure", "dose", "--outcome", "rhr", "--cohort", "clinic", "--time", "day",
            "--mcid", "2", "--direction", "lower"]  # fmt: skip
    result = subprocess.run(
        [*base, "--smooth", "age", "--covariates", "group", "--daily-cycle", "2",
         "--time-of-day", "clock", "--output", str(output)],
        cwd=repo, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    fit = json.loads(output.read_text())
    assert fit["diagnostics"]["covariates"][:2] == ["group=B", "age"]
    assert fit["diagnostics"]["time_covariates"] == [
        "clock:cos1", "clock:sin1", "clock:cos2", "clock:sin2",
    ]  # fmt: skip
    (curve,) = fit["curves"]
    assert curve["covariate"] == "age" and len(curve["grid"]) == 41
    for band in (curve["effect"], curve["intercept_shift"], fit["daily_cycle"]):
        assert np.all(np.asarray(band["q05"]) <= np.asarray(band["mean"]))
        assert np.all(np.asarray(band["mean"]) <= np.asarray(band["q95"]))
    cycle = fit["daily_cycle"]
    peak = cycle["hour"][int(np.argmax(cycle["mean"]))]
    assert abs(peak - 16.0) <= 1.5, f"daily peak at {peak} h"
    assert "effect by age (90% band)" in result.stderr
    assert "daily cycle: peak" in result.stderr

    def error_of(*flags: str) -> str:
        failed = subprocess.run(
            [*base, *flags], cwd=repo, capture_output=True, text=True, timeout=600, check=False
        )
        assert failed.returncode == 2, failed.stderr
        return failed.stderr

    no_time = [flag for flag in base if flag not in ("--time", "day")]
    assert (
        "--daily-cycle needs the hour"
        in subprocess.run(
            [*no_time, "--daily-cycle"], cwd=repo, capture_output=True, text=True, check=False
        ).stderr
    )
    assert "must be a numeric column" in error_of("--smooth", "group")
    assert "only used with --daily-cycle" in error_of("--time-of-day", "clock")
    assert "must lie in [0, 24]" in error_of("--daily-cycle", "1", "--time-of-day", "rhr")
