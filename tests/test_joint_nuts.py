"""The joint model's SVI fit against NUTS on the same model with every patient
block sampled (model.joint.uncollapsed_model): a simulated programme of 30
patients, 3 measures whose effects correlate 0.7, 6 readings of each.

Tolerances. Patient effects: the SVI mixture is exact given θ, so differences
come from q(θ) and NUTS's Monte Carlo error (~1000 draws, ESS a few hundred:
≈ 0.05 sd on a mean); a median |mean difference| ≤ 0.10 NUTS sd and a median sd
ratio in 0.9-1.1 are the project's fidelity targets. The correlation is weakly
identified by 30 patients (NUTS sd ≈ 0.25): its SVI posterior mean within 0.25
NUTS sd, its sd within 25%, allow q(θ)'s Gaussian shape in unconstrained space.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from numpyro.infer import MCMC, NUTS

from model.joint import (
    cohort_posteriors,
    describe_correlation,
    fit_joint,
    joint_cohorts,
    joint_config_for,
    joint_grams,
    joint_patients,
    uncollapsed_data,
    uncollapsed_model,
)
from model.simulate import joint_design, simulate_joint

jax.config.update("jax_enable_x64", True)

PATIENTS, READINGS = 30, 6


def test_joint_svi_matches_nuts():
    events, _ = simulate_joint(
        np.full((PATIENTS, 3), READINGS),
        **joint_design(3),
        effect_correlation=0.7,
        seed=1,
    )
    config = joint_config_for(events)
    gram = joint_grams(events, config)
    draws, info, _, _ = fit_joint(gram, config, seed=0)
    assert info.converged
    patients = joint_patients(draws, gram, config)

    mcmc = MCMC(
        NUTS(uncollapsed_model, target_accept_prob=0.9),
        num_warmup=500,
        num_samples=1000,
        progress_bar=False,
    )
    data = (jnp.asarray(column) for column in uncollapsed_data(events, config))
    mcmc.run(jax.random.PRNGKey(1), *data, PATIENTS, config.structure)
    samples = mcmc.get_samples()

    effects = np.asarray(samples["effects"])  # (S, P, M), standardised
    nuts_mean, nuts_sd = effects.mean(axis=0), effects.std(axis=0, ddof=1)
    assert np.median(np.abs(patients.effect_mean - nuts_mean) / nuts_sd) <= 0.10
    assert 0.9 <= np.median(patients.effect_sd / nuts_sd) <= 1.1

    chol = np.asarray(samples["L_effects"])
    omega = np.einsum("sij,skj->sik", chol, chol)
    upper = np.triu_indices(3, 1)
    correlation = describe_correlation(draws)
    svi_mean = np.asarray(correlation["mean"])[upper]
    svi_sd = np.asarray(correlation["sd"])[upper]
    nuts_corr_mean, nuts_corr_sd = omega.mean(axis=0)[upper], omega.std(axis=0, ddof=1)[upper]
    np.testing.assert_array_less(np.abs(svi_mean - nuts_corr_mean), 0.25 * nuts_corr_sd)
    np.testing.assert_array_less(np.abs(svi_sd / nuts_corr_sd - 1.0), 0.25)


COHORTS, PER_COHORT = 8, 6


def test_joint_svi_with_a_cohort_level_matches_nuts():
    """Two measures (effects correlating 0.7), 8 cohorts of 6 patients, each
    cohort's effects shifted (sds 0.6 and 0.3, raw units, against patient sds
    1 and 0.5): SVI with every cohort's u_g integrated out exactly against NUTS
    sampling the patients' blocks and the cohorts' u_g. Patient effects include
    their cohort's shift in both; same tolerances as above (the exact mixture
    over u_g's posterior given θ leaves q(θ) and NUTS's Monte Carlo error), and
    every patient within 0.3 NUTS sd (Monte Carlo error ≈ 0.05 sd, so ≈ 0.15 at
    most over 96 effects; a patient step that dropped its cohort's shift is
    off by up to 1.1 sd here while its median stays under 0.10). Cohort
    posteriors (cohort_posteriors mixed over the draws, against NUTS's u_g):
    means within 0.3 NUTS sd (median 0.10); sds within 0.75-1.1 of NUTS's, as
    8 cohorts identify τ_u weakly (the correlation's allowance above) and
    q(θ) errs towards a smaller τ_u."""
    count = COHORTS * PER_COHORT
    cohort = np.repeat(np.arange(COHORTS), PER_COHORT)
    events, _ = simulate_joint(
        np.full((count, 2), READINGS),
        **joint_design(2),
        effect_correlation=0.7,
        seed=2,
        cohort_of_patient=cohort,
        cohort_effect_sd=[0.6, 0.3],
    )
    config = joint_config_for(events, cohort_level=True)
    gram = joint_grams(events, config)
    cohort, num_cohorts = joint_cohorts(events)
    draws, info, _, _ = fit_joint(gram, config, seed=0, cohort=cohort, num_cohorts=num_cohorts)
    assert info.converged
    patients = joint_patients(draws, gram, config, cohort=cohort, num_cohorts=num_cohorts)

    mcmc = MCMC(
        NUTS(uncollapsed_model, target_accept_prob=0.9),
        num_warmup=500,
        num_samples=1000,
        progress_bar=False,
    )
    data = (jnp.asarray(column) for column in uncollapsed_data(events, config))
    mcmc.run(
        jax.random.PRNGKey(3), *data, count, config.structure, jnp.asarray(cohort), num_cohorts
    )
    effects = np.asarray(mcmc.get_samples()["effects"])  # (S, P, M), standardised
    nuts_mean, nuts_sd = effects.mean(axis=0), effects.std(axis=0, ddof=1)
    distance = np.abs(patients.effect_mean - nuts_mean) / nuts_sd
    assert np.median(distance) <= 0.10
    assert np.max(distance) <= 0.3
    assert 0.9 <= np.median(patients.effect_sd / nuts_sd) <= 1.1

    means, covs = cohort_posteriors(
        draws, jnp.asarray(gram), jnp.asarray(cohort), num_cohorts, config.structure
    )
    means, variances = np.asarray(means), np.diagonal(np.asarray(covs), axis1=-2, axis2=-1)
    svi_u_mean = means.mean(axis=0)
    svi_u_sd = np.sqrt(variances.mean(axis=0) + means.var(axis=0))
    shifts = np.asarray(mcmc.get_samples()["cohort_effects"])  # (S, G, M)
    nuts_u_mean, nuts_u_sd = shifts.mean(axis=0), shifts.std(axis=0, ddof=1)
    u_distance = np.abs(svi_u_mean - nuts_u_mean) / nuts_u_sd
    assert np.median(u_distance) <= 0.10
    assert np.max(u_distance) <= 0.3
    np.testing.assert_array_less(0.75, svi_u_sd / nuts_u_sd)
    np.testing.assert_array_less(svi_u_sd / nuts_u_sd, 1.1)
