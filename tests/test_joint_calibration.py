"""A patient with many glucose readings and two HbA1c results: the joint model's
HbA1c interval is narrower than the per-measure model's and still calibrated.
And with no correlation in the truth the joint model is no worse than the
per-measure fits beyond Monte Carlo error (second test).

Simulation (ground truth): 100 patients with 30 glucose and 12 HbA1c readings
(they identify θ), 200 with 30 glucose and 2 HbA1c; effects correlate 0.7.
Coverage of the true HbA1c effects by the joint model's 90% intervals over the
200 sparse patients: binomial sd √(0.9·0.1/200) = 0.021, so [0.83, 0.97] is
about ±3 sd. Width: with ρ = 0.7 and the glucose effect well measured the
conditional prior variance of the HbA1c effect is ≈ (1 − 0.49·0.9) of the
marginal one, so intervals built mostly on the prior narrow by ≈ 25%; the test
asks for at least 10%.
"""

from __future__ import annotations

import jax
import numpy as np

from model.config import MeasureConfig, PriorConfig
from model.joint import fit_joint, joint_config_for, joint_grams, joint_patients
from model.offline import fit_programme
from model.simulate import joint_design, simulate_joint

jax.config.update("jax_enable_x64", True)

RICH, SPARSE = 100, 200


def test_sparse_measure_borrows_from_the_rich_one():
    count = RICH + SPARSE
    readings = np.column_stack([np.full(count, 30), np.where(np.arange(count) < RICH, 12, 2)])
    events, truth = simulate_joint(
        readings,
        **joint_design(2),
        effect_correlation=0.7,
        seed=5,
    )
    sparse = np.arange(count) >= RICH
    hba1c = truth[sparse, 1]

    config = joint_config_for(events)
    gram = joint_grams(events, config)
    draws, _, _, _ = fit_joint(gram, config, seed=0)
    patients = joint_patients(draws, gram, config)
    std = config.measures[1].standardization
    lower = std.effect_to_raw(patients.effect_lower[sparse, 1])
    upper = std.effect_to_raw(patients.effect_upper[sparse, 1])
    coverage = np.mean((lower <= hba1c) & (hba1c <= upper))
    assert 0.83 <= coverage <= 0.97

    _, alone = fit_programme(
        events[1],
        MeasureConfig(name="hba1c", unit="%", direction="lower", mcid=0.3),
        time_trend=False,
        cohort_level=False,
    )
    width_alone = np.mean(alone.upper[sparse] - alone.lower[sparse])
    assert np.mean(upper - lower) <= 0.9 * width_alone


def zero_correlation_comparison(
    priors: PriorConfig, seeds: range
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Programmes of 200 patients, 3 measures whose effects do not correlate
    (effect sds 1, 0.5, 1.5; residual sds 1, 0.5, 3: the third measure is the
    noisy one), 2-12 readings of each per patient: per programme and measure,
    the joint / per-measure RMSE ratio of the effects' posterior means against
    the truth, and each model's coverage of the true effects by 90% intervals."""
    ratios, covered_joint, covered_alone = [], [], []
    for seed in seeds:
        readings = np.random.default_rng([seed, 1]).integers(2, 13, (200, 3))
        events, truth = simulate_joint(
            readings,
            **joint_design(3),
            effect_correlation=0.0,
            seed=seed,
        )
        config = joint_config_for(events, priors=priors)
        gram = joint_grams(events, config)
        draws, _, _, _ = fit_joint(gram, config, seed=seed)
        patients = joint_patients(draws, gram, config)
        row_ratio, row_joint, row_alone = [], [], []
        for m, measure in enumerate(config.measures):
            std = measure.standardization
            mean = std.effect_to_raw(patients.effect_mean[:, m])
            lower = std.effect_to_raw(patients.effect_lower[:, m])
            upper = std.effect_to_raw(patients.effect_upper[:, m])
            _, alone = fit_programme(
                events[m],
                MeasureConfig(name=f"m{m}", unit="", mcid=0.0),
                seed=seed,
                time_trend=False,
                cohort_level=False,
            )
            truth_m = truth[:, m]
            row_ratio.append(
                np.sqrt(np.mean((mean - truth_m) ** 2) / np.mean((alone.mean - truth_m) ** 2))
            )
            row_joint.append(np.mean((lower <= truth_m) & (truth_m <= upper)))
            row_alone.append(np.mean((alone.lower <= truth_m) & (truth_m <= alone.upper)))
        ratios.append(row_ratio)
        covered_joint.append(row_joint)
        covered_alone.append(row_alone)
    return np.array(ratios), np.array(covered_joint), np.array(covered_alone)


def test_without_correlation_the_joint_model_is_no_worse_than_per_measure_fits():
    """Six programmes with uncorrelated effects (the benchmark's, §12: seeds 0-5).
    Monte Carlo error is the spread over programmes: for each measure, the mean
    RMSE ratio may exceed 1 by at most two standard errors of that mean, and the
    joint model's coverage may fall short of the per-measure model's by at most
    two standard errors of the mean paired difference. Under the plain LKJ(3, 2)
    prior (no spike at independence) the noisy measure fails the first (RMSE
    ratio 1.025 ± 0.007; coverage 3.5 points short, 1.8 se): the posterior pays
    the correlations' Occam price by shrinking its effect sd."""
    ratios, joint, alone = zero_correlation_comparison(PriorConfig(), range(6))
    count = ratios.shape[0]
    for m in range(3):
        se = ratios[:, m].std(ddof=1) / np.sqrt(count)
        assert ratios[:, m].mean() - 1.0 <= 2.0 * se, (m, ratios[:, m])
        shortfall = alone[:, m] - joint[:, m]
        assert shortfall.mean() <= 2.0 * shortfall.std(ddof=1) / np.sqrt(count), (m, shortfall)
