"""Sequential variational inference of the population posterior q(θ).

numpyro defines a model over the hyperparameters θ alone: their priors plus one
factor, the collapsed log-likelihood of all evidence (model.likelihood). SVI fits
a full-rank Gaussian guide over the handful of unconstrained θ.

The *sequential update* is a pure step::

    state, info = fitter.update(state, evidence, rng_key)

It continues Adam from the previous variational parameters for a bounded number
of steps against the exact likelihood of all evidence so far, so approximation
error does not accumulate across updates. Each run decays the learning rate
geometrically so the final parameters settle instead of jittering at the
stochastic-gradient noise floor.

Compilation: evidence is padded to power-of-two patient and cohort counts
(padding contributes exactly zero to the likelihood), and steps run in fixed
chunks under ``lax.scan``, so the step function compiles once per padded shape.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.distributions.transforms import LowerCholeskyAffine, biject_to
from numpyro.infer import SVI, Trace_ELBO
from numpyro.infer.autoguide import AutoMultivariateNormal
from numpyro.infer.initialization import init_to_value
from numpyro.infer.svi import SVIState

from model.config import ModelConfig, SVIConfig
from model.evidence import PatientStats
from model.likelihood import Hyper, collapsed_loglik

CHUNK_STEPS = 50
MIN_PATIENT_BUCKET = 64
MIN_COHORT_BUCKET = 8
FINAL_LEARNING_RATE_RATIO = 0.05


class Evidence(NamedTuple):
    """Padded, device-ready evidence of one measure.

    gram: (P_pad, d, d) standardised Gram matrices (zeros beyond num_patients).
    cohort: (P_pad,) cohort index of each patient (0 for padding).
    num_patients: real patients; num_cohorts: padded cohort count (static).
    """

    gram: jax.Array
    cohort: jax.Array
    num_patients: int
    num_cohorts: int


#: The smallest padded batch of per-patient scoring and predictive work: batches
#: of 1-8 share one compiled shape (a compile costs ~1 s, the padding ~µs).
SMALL_BUCKET = 8


def bucket_size(size: int, minimum: int) -> int:
    """The power of two ≥ size (at least minimum): padded shapes, so few compiles."""
    return max(minimum, 1 << max(0, math.ceil(math.log2(max(size, 1)))))


def pad_evidence(stats: PatientStats, cohort: np.ndarray, num_cohorts: int) -> Evidence:
    """Pad statistics to power-of-two buckets so repeated updates reuse one compile."""
    num_patients = stats.num_patients
    cohort = np.asarray(cohort, dtype=np.int32)
    if cohort.shape != (num_patients,):
        raise ValueError(f"cohort must have shape ({num_patients},), got {cohort.shape}")
    if num_patients and (cohort.min() < 0 or cohort.max() >= num_cohorts):
        raise ValueError(f"cohort indices must lie in [0, {num_cohorts})")
    p_pad = bucket_size(num_patients, MIN_PATIENT_BUCKET)
    g_pad = bucket_size(num_cohorts, MIN_COHORT_BUCKET)
    gram = np.zeros((p_pad, *stats.gram.shape[1:]))
    gram[:num_patients] = stats.gram
    padded_cohort = np.zeros(p_pad, dtype=np.int32)
    padded_cohort[:num_patients] = cohort
    return Evidence(jnp.asarray(gram), jnp.asarray(padded_cohort), num_patients, g_pad)


def hyper_model(gram: jax.Array, cohort: jax.Array, num_cohorts: int, config: ModelConfig) -> None:
    """numpyro model over θ alone: priors (PriorConfig) and the collapsed likelihood."""
    priors = config.priors
    mu = numpyro.sample("mu", dist.Normal(0.0, priors.population_mean_sd).expand([2]).to_event(1))
    fixed_scale = config.fixed_effect_scale
    if fixed_scale is None:
        tau = numpyro.sample("tau", dist.HalfNormal(priors.patient_scale).expand([2]).to_event(1))
        corr_chol = numpyro.sample("L_omega", dist.LKJCholesky(2, priors.lkj_concentration))
    else:  # complete or no pooling of the effect: only the intercept scale is learned
        tau_a = numpyro.sample("tau_intercept", dist.HalfNormal(priors.patient_scale))
        tau, corr_chol = _fixed_effect_scale(tau_a, fixed_scale)
    sigma = numpyro.sample("sigma", dist.HalfNormal(priors.residual_scale))
    if config.time_trend:
        gamma = numpyro.sample(
            "gamma", dist.Normal(0.0, priors.trend_sd).expand([config.fixed_dim]).to_event(1)
        )
    else:
        gamma = jnp.zeros(0)
    if config.cohort_level:
        tau_cohort = numpyro.sample("tau_cohort", dist.HalfNormal(priors.cohort_scale))
    else:
        tau_cohort = jnp.zeros(())
    theta = Hyper(mu, tau, corr_chol, tau_cohort, sigma, gamma)
    numpyro.factor("collapsed_loglik", collapsed_loglik(theta, gram, cohort, num_cohorts, config))


def _fixed_effect_scale(
    tau_intercept: jax.Array, effect_scale: float
) -> tuple[jax.Array, jax.Array]:
    """τ = (τ_a, fixed τ_b) and an identity correlation factor, any leading axes."""
    tau = jnp.stack([tau_intercept, jnp.full_like(tau_intercept, effect_scale)], axis=-1)
    corr_chol = jnp.broadcast_to(jnp.eye(2, dtype=tau.dtype), (*tau_intercept.shape, 2, 2))
    return tau, corr_chol


def hyper_from_sites(sites: dict[str, jax.Array], config: ModelConfig) -> Hyper:
    """Hyper from numpyro sample sites (constrained), with any leading draw axes."""
    batch = sites["mu"].shape[:-1]
    gamma = sites["gamma"] if config.time_trend else jnp.zeros((*batch, 0))
    tau_cohort = sites["tau_cohort"] if config.cohort_level else jnp.zeros(batch)
    if config.fixed_effect_scale is None:
        tau, corr_chol = sites["tau"], sites["L_omega"]
    else:
        tau, corr_chol = _fixed_effect_scale(sites["tau_intercept"], config.fixed_effect_scale)
    return Hyper(sites["mu"], tau, corr_chol, tau_cohort, sites["sigma"], gamma)


class AnchoredMultivariateNormal(AutoMultivariateNormal):
    """Full-rank Gaussian guide over unconstrained θ, whitened by an anchor.

    q(φ) = N(m₀ + L₀ z_loc, (L₀ Z)(L₀ Z)ᵀ) where (m₀, L₀) is the anchor (the fit
    so far, held fixed by stop_gradient) and (z_loc, Z) are the trained
    parameters, starting at (0, I). Adam's step is then a fraction of a posterior
    sd whatever the amount of data: with 100k patients the posterior of θ is ~100×
    narrower than with 10, and an un-whitened guide would either crawl or jitter.
    ``PopulationFitter`` folds (z_loc, Z) into the anchor after every chunk.
    """

    def _get_posterior(self) -> dist.MultivariateNormal:
        loc, scale_tril = self._compose(
            numpyro.param(f"{self.prefix}_anchor_loc", self._init_latent),
            numpyro.param(
                f"{self.prefix}_anchor_scale_tril", jnp.identity(self.latent_dim) * self._init_scale
            ),
            numpyro.param(f"{self.prefix}_loc", jnp.zeros(self.latent_dim)),
            numpyro.param(
                f"{self.prefix}_scale_tril",
                jnp.identity(self.latent_dim),
                constraint=self.scale_tril_constraint,
            ),
        )
        return dist.MultivariateNormal(loc, scale_tril=scale_tril)

    @staticmethod
    def _compose(anchor_loc, anchor_tril, z_loc, z_tril) -> tuple[jax.Array, jax.Array]:
        anchor_loc = jax.lax.stop_gradient(anchor_loc)
        anchor_tril = jax.lax.stop_gradient(anchor_tril)
        return anchor_loc + anchor_tril @ z_loc, anchor_tril @ z_tril

    def get_transform(self, params: dict[str, jax.Array]) -> LowerCholeskyAffine:
        p = self.prefix
        loc, scale_tril = self._compose(
            params[f"{p}_anchor_loc"],
            params[f"{p}_anchor_scale_tril"],
            params[f"{p}_loc"],
            params[f"{p}_scale_tril"],
        )
        return LowerCholeskyAffine(loc, scale_tril)

    def reanchored(self, params: dict[str, jax.Array]) -> dict[str, jax.Array]:
        """Unconstrained parameters with the current q as the new anchor and the
        trained part reset to (0, I): the same q, freshly whitened."""
        transform = self.get_transform(params)
        p = self.prefix
        identity = jnp.identity(self.latent_dim)
        return {
            f"{p}_anchor_loc": transform.loc,
            f"{p}_anchor_scale_tril": transform.scale_tril,
            f"{p}_loc": jnp.zeros(self.latent_dim),
            f"{p}_scale_tril": biject_to(self.scale_tril_constraint).inv(identity),
        }


class FitState(NamedTuple):
    """Carried state of the sequential fit: numpyro's SVIState plus counters."""

    svi_state: SVIState
    total_steps: int
    version: int


class UpdateInfo(NamedTuple):
    """Per-update diagnostics. ``elbo`` is the mean over the last chunk of steps;
    ``elbo_change`` the change of that mean over the previous chunk, in units of
    its Monte Carlo standard error: |change| < 3 is reported as converged."""

    elbo: float
    elbo_se: float
    elbo_change: float
    steps: int
    converged: bool
    losses: np.ndarray


def _initial_values(config: ModelConfig) -> dict[str, jax.Array]:
    """Start at a plausible point in standardised units (outcome sd ≈ 1)."""
    values = {"mu": jnp.zeros(2), "sigma": jnp.asarray(0.5)}
    if config.fixed_effect_scale is None:
        values.update(tau=jnp.array([0.5, 0.3]), L_omega=jnp.eye(2))
    else:
        values["tau_intercept"] = jnp.asarray(0.5)
    if config.time_trend:
        values["gamma"] = jnp.zeros(config.fixed_dim)
    if config.cohort_level:
        values["tau_cohort"] = jnp.asarray(0.1)
    return values


class PopulationFitter:
    """Static configuration of the variational fit; all state is in FitState."""

    def __init__(self, config: ModelConfig, svi_config: SVIConfig | None = None) -> None:
        self.config = config
        self.svi_config = svi_config or SVIConfig()
        self.guide = AnchoredMultivariateNormal(
            hyper_model, init_loc_fn=init_to_value(values=_initial_values(config)), init_scale=0.05
        )
        self._fresh = self._build_svi(self.svi_config.fresh_steps, self.svi_config.num_particles)
        self._warm = self._build_svi(self.svi_config.update_steps, self.svi_config.update_particles)
        self.trace_count = 0  # incremented at trace time: a recompilation shows here

    def _build_svi(self, steps: int, num_particles: int) -> tuple[SVI, Callable]:
        lr = self.svi_config.learning_rate
        decay = FINAL_LEARNING_RATE_RATIO ** (1.0 / max(steps, 1))

        def schedule(step: jax.Array) -> jax.Array:
            return lr * decay ** jnp.minimum(step, steps)

        svi = SVI(
            hyper_model,
            self.guide,
            numpyro.optim.Adam(schedule),
            Trace_ELBO(num_particles=num_particles),
        )

        def run_chunk(svi_state: SVIState, gram, cohort, num_cohorts):
            self.trace_count += 1
            # One patients-last copy of the evidence per chunk: inside the steps each
            # Gram entry is then a contiguous row, so the likelihood's loops over
            # patients read 1/d² of the memory a strided (P, d, d) slice touches.
            by_entry = jnp.moveaxis(gram, 0, -1)

            def body(state, _):
                patients_first = jnp.moveaxis(by_entry, -1, 0)  # a view, fused into readers
                state, loss = svi.update(state, patients_first, cohort, num_cohorts, self.config)
                return state, loss

            return jax.lax.scan(body, svi_state, None, length=CHUNK_STEPS)

        return svi, jax.jit(run_chunk, static_argnums=3)

    def init(self, rng_key: jax.Array, evidence: Evidence) -> FitState:
        """Variational parameters at their initial values; no steps taken yet."""
        args = (evidence.gram, evidence.cohort, evidence.num_cohorts, self.config)
        # Both SVI objects (fresh and warm schedules) must see the model once to
        # set up their constraint transforms; they share the guide and its params.
        self._warm[0].init(rng_key, *args)
        svi_state = self._fresh[0].init(rng_key, *args)
        return FitState(svi_state, 0, 0)

    def update(
        self,
        state: FitState,
        evidence: Evidence,
        rng_key: jax.Array,
        *,
        steps: int | None = None,
        progress: Callable[[int, int, float], None] | None = None,
    ) -> tuple[FitState, UpdateInfo]:
        """Continue SVI from ``state`` against all of ``evidence``.

        The first update of a fresh state runs ``fresh_steps``; later ones
        ``update_steps`` (rounded up to whole chunks). q carries over; the guide is
        re-anchored on it before every chunk (so Adam's moments restart there) and
        the learning-rate schedule restarts at each update.
        ``progress(done, total, elbo)`` is called after every chunk.
        """
        fresh = state.total_steps == 0
        svi, run_chunk = self._fresh if fresh else self._warm
        if steps is None:
            steps = self.svi_config.fresh_steps if fresh else self.svi_config.update_steps
        num_chunks = max(1, math.ceil(steps / CHUNK_STEPS))
        svi_state = state.svi_state._replace(rng_key=rng_key)
        chunk_losses = []
        for done in range(num_chunks):
            svi_state = self._reanchor(svi, svi_state, restart_schedule=done == 0)
            svi_state, losses = run_chunk(
                svi_state, evidence.gram, evidence.cohort, evidence.num_cohorts
            )
            losses = np.asarray(losses)
            chunk_losses.append(losses)
            if progress is not None:
                progress((done + 1) * CHUNK_STEPS, num_chunks * CHUNK_STEPS, -float(losses.mean()))
        last = chunk_losses[-1]
        elbo_se = float(last.std(ddof=1) / np.sqrt(last.size))
        change = (
            float(chunk_losses[-2].mean() - last.mean()) / max(elbo_se, 1e-12)
            if len(chunk_losses) > 1
            else float("nan")
        )
        info = UpdateInfo(
            elbo=-float(last.mean()),
            elbo_se=elbo_se,
            elbo_change=change,
            steps=num_chunks * CHUNK_STEPS,
            converged=bool(abs(change) < 3.0),
            losses=np.concatenate(chunk_losses),
        )
        return FitState(svi_state, state.total_steps + info.steps, state.version + 1), info

    def _reanchor(self, svi: SVI, svi_state: SVIState, *, restart_schedule: bool) -> SVIState:
        """Fold the trained part of the guide into its anchor; reset Adam's moments."""
        step, _ = svi_state.optim_state
        step_init, optim_state = svi.optim.init(self.guide.reanchored(svi.get_params(svi_state)))
        return SVIState(
            (step_init if restart_schedule else step, optim_state),
            svi_state.mutable_state,
            svi_state.rng_key,
        )

    def params(self, state: FitState) -> dict[str, jax.Array]:
        """Constrained variational parameters (loc, scale_tril) of the guide."""
        svi, _ = self._warm
        return svi.get_params(state.svi_state)

    def draws(self, state: FitState, rng_key: jax.Array, num_draws: int | None = None) -> Hyper:
        """``num_draws`` draws of θ from q, with a leading draw axis. Fixed by the key:
        derive the key from the population version so scores are reproducible."""
        num_draws = num_draws or self.svi_config.num_draws
        sites = self.guide.sample_posterior(rng_key, self.params(state), sample_shape=(num_draws,))
        return hyper_from_sites(sites, self.config)
