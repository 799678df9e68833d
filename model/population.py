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
Nothing runs eagerly: the initial state, each chunk (re-anchoring included) and
the draws from q are one jitted call each, so a fit is a handful of XLA
compilations (which JAX's persistent cache keeps across processes), not hundreds
of one-operation ones.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro import handlers
from numpyro.distributions.constraints import Constraint
from numpyro.distributions.transforms import LowerCholeskyAffine, UnpackTransform, biject_to
from numpyro.infer import SVI
from numpyro.infer.autoguide import (
    AutoMultivariateNormal,
    _ravel_dict,
    _ravel_dict_with_shape_dict,
    _unravel_dict,
)
from numpyro.infer.elbo import ELBO
from numpyro.infer.initialization import init_to_value
from numpyro.infer.svi import SVIState
from numpyro.infer.util import compute_log_probs

from model.config import ModelConfig, SVIConfig
from model.evidence import PatientStats
from model.exported import ExportCache, through
from model.families import laplace_loglik
from model.likelihood import Hyper, collapsed_loglik
from model.smooth import coefficients, sample_coefficients, spline_blocks

CHUNK_STEPS = 50
MIN_PATIENT_BUCKET = 64
MIN_COHORT_BUCKET = 8
FINAL_LEARNING_RATE_RATIO = 0.05


class Evidence(NamedTuple):
    """Padded, device-ready evidence of one measure.

    gram: (P_pad, d, d) standardised Gram matrices (zeros beyond num_patients),
    or for a Bernoulli or Poisson measure the cell statistics (P_pad,
    model.families.CELLS).
    cohort: (P_pad,) cohort index of each patient (0 for padding).
    num_patients: real patients; num_cohorts: padded cohort count (static).
    covariates: (P_pad, q) standardised patient covariates (zeros for padding),
    None when the model has none.
    groups: (P_pad, L) group index of each patient at each further grouping
    level (ModelConfig.grouping_levels; 0 for padding), None without;
    num_groups: each level's padded group count (static).
    """

    gram: jax.Array
    cohort: jax.Array
    num_patients: int
    num_cohorts: int
    covariates: jax.Array | None = None
    groups: jax.Array | None = None
    num_groups: tuple[int, ...] = ()

    @property
    def fit_args(self) -> tuple:
        """(gram, cohort, num_cohorts, covariates, groups, num_groups): the
        arguments of hyper_model (and collapsed_loglik) after the config's place."""
        return (
            self.gram,
            self.cohort,
            self.num_cohorts,
            self.covariates,
            self.groups,
            self.num_groups,
        )


#: The smallest padded batch of per-patient scoring and predictive work: batches
#: of 1-8 share one compiled shape (a compile costs ~1 s, the padding ~µs).
SMALL_BUCKET = 8


def bucket_size(size: int, minimum: int) -> int:
    """The power of two ≥ size (at least minimum): padded shapes, so few compiles."""
    return max(minimum, 1 << max(0, math.ceil(math.log2(max(size, 1)))))


def pad_evidence(
    stats: PatientStats,
    cohort: np.ndarray,
    num_cohorts: int,
    covariates: np.ndarray | None = None,
    groups: np.ndarray | None = None,
    num_groups: tuple[int, ...] = (),
) -> Evidence:
    """Pad statistics to power-of-two buckets so repeated updates reuse one compile.
    covariates: (P, q) standardised patient covariates, or None; groups: (P, L)
    index of each patient's group at each further grouping level, level l in
    [0, num_groups[l]), or None (each level's count is padded like the cohorts')."""
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
    padded_covariates = None
    if covariates is not None:
        covariates = np.asarray(covariates, dtype=float).reshape(num_patients, -1)
        padded_covariates = np.zeros((p_pad, covariates.shape[1]))
        padded_covariates[:num_patients] = covariates
        padded_covariates = jax.device_put(padded_covariates)
    padded_groups, padded_counts = None, ()
    if groups is not None:
        groups = np.asarray(groups, dtype=np.int32).reshape(num_patients, len(num_groups))
        if num_patients and (groups.min() < 0 or np.any(groups.max(axis=0) >= num_groups)):
            raise ValueError(f"group indices must lie in [0, {num_groups}) per level")
        padded_groups = np.zeros((p_pad, groups.shape[1]), dtype=np.int32)
        padded_groups[:num_patients] = groups
        padded_groups = jax.device_put(padded_groups)
        padded_counts = tuple(bucket_size(count, MIN_COHORT_BUCKET) for count in num_groups)
    return Evidence(  # device_put, not jnp.asarray: that compiles a program per shape
        jax.device_put(gram),
        jax.device_put(padded_cohort),
        num_patients,
        g_pad,
        padded_covariates,
        padded_groups,
        padded_counts,
    )


def hyper_model(
    gram: jax.Array,
    cohort: jax.Array,
    num_cohorts: int,
    config: ModelConfig,
    covariates: jax.Array | None = None,
    groups: jax.Array | None = None,
    num_groups: tuple[int, ...] = (),
) -> None:
    """numpyro model over θ alone: priors (PriorConfig) and the collapsed likelihood.
    Every further grouping level's sd has the cohort level's prior. For a
    Bernoulli or Poisson measure (config.family) ``gram`` holds the patients'
    cell statistics (P, model.families.CELLS), the likelihood is the Laplace
    one (model.families.laplace_loglik) and there is no σ."""
    priors = config.priors
    mu = numpyro.sample("mu", dist.Normal(0.0, priors.population_mean_sd).expand([2]).to_event(1))
    fixed_scale = config.fixed_effect_scale
    if fixed_scale is None:
        tau = numpyro.sample("tau", dist.HalfNormal(priors.patient_scale).expand([2]).to_event(1))
        corr_chol = numpyro.sample("L_omega", dist.LKJCholesky(2, priors.lkj_concentration))
    else:  # complete or no pooling of the effect: only the intercept scale is learned
        tau_a = numpyro.sample("tau_intercept", dist.HalfNormal(priors.patient_scale))
        tau, corr_chol = _fixed_effect_scale(tau_a, fixed_scale)
    gaussian = config.family == "gaussian"
    if gaussian:
        sigma = numpyro.sample("sigma", dist.HalfNormal(priors.residual_scale))
    else:  # no residual sd: the family's variance is a function of its mean
        sigma = jnp.ones(())
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
    coef = sample_coefficients(config) if config.num_covariates else None
    tau_groups = None
    if config.grouping_levels:
        tau_groups = numpyro.sample(
            "tau_groups",
            dist.HalfNormal(priors.cohort_scale).expand([len(config.grouping_levels)]).to_event(1),
        )
    theta = Hyper(mu, tau, corr_chol, tau_cohort, sigma, gamma, coef, tau_groups)
    loglik = collapsed_loglik if gaussian else laplace_loglik
    numpyro.factor(
        "collapsed_loglik",
        loglik(theta, gram, cohort, num_cohorts, config, covariates, groups, tuple(num_groups)),
    )


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
    coef = (
        coefficients(sites["coef"], sites.get("smooth_sd"), config)
        if config.num_covariates
        else None
    )
    tau_groups = sites["tau_groups"] if config.grouping_levels else None
    sigma = sites["sigma"] if config.family == "gaussian" else jnp.ones(batch)
    return Hyper(sites["mu"], tau, corr_chol, tau_cohort, sigma, gamma, coef, tau_groups)


class SiteSupport(NamedTuple):
    """What the guide reads of a latent site's distribution: support and event dim."""

    support: Constraint
    event_dim: int


class AnchoredMultivariateNormal(AutoMultivariateNormal):
    """Full-rank Gaussian guide over unconstrained θ, whitened by an anchor.

    q(φ) = N(m₀ + L₀ z_loc, (L₀ Z)(L₀ Z)ᵀ) where (m₀, L₀) is the anchor (the fit
    so far, held fixed by stop_gradient) and (z_loc, Z) are the trained
    parameters, starting at (0, I). Adam's step is then a fraction of a posterior
    sd whatever the amount of data: with 100k patients the posterior of θ is ~100×
    narrower than with 10, and an un-whitened guide would either crawl or jitter.
    ``PopulationFitter`` folds (z_loc, Z) into the anchor after every chunk.

    The guide learns the model's latent sites without running the model on values
    (``_setup_prototype``) and constrains draws with each site's bijection
    (``_unpack_and_constrain``), so nothing about it is eager and it may first be
    called while ``jit`` traces.
    """

    def _setup_prototype(self, *args: Any, **kwargs: Any) -> None:
        """The latent sites of the model, their supports and the unconstrained
        initial point, read from an abstract trace of the model.

        numpyro's own setup (``initialize_model``) runs the model eagerly and
        differentiates its potential energy at the initial point: some 390 XLA
        compilations of one operation each, 12 s of every ``efficacy fit`` on two
        cores. Here the model is traced by ``jax.eval_shape`` (shapes and supports;
        nothing computed, nothing compiled) and the initial point is
        ``init_loc_fn``'s value of each site (``init_to_value``: every latent site
        needs one) mapped to unconstrained space. The attributes set are those
        numpyro's AutoContinuous setup sets and its ``__call__`` reads;
        tests/test_population.py checks they equal numpyro's own.
        """
        sites: dict[str, tuple[SiteSupport, Any]] = {}

        def structure() -> None:
            model_trace = handlers.trace(handlers.seed(self.model, rng_seed=0)).get_trace(
                *args, **kwargs
            )
            for name, site in model_trace.items():
                if site["type"] != "sample" or site["is_observed"]:
                    continue
                if site["cond_indep_stack"]:
                    raise ValueError(f"{name!r} is in a plate: no local latent sites here")
                value = self.init_loc_fn(site)
                if isinstance(value, jax.core.Tracer):
                    raise ValueError(f"init_loc_fn must give {name!r} a value (init_to_value)")
                sites[name] = (SiteSupport(site["fn"].support, site["fn"].event_dim), value)

        with handlers.block():  # hide the model's sites from the caller's handlers
            jax.eval_shape(structure)

        names = list(sites)  # in the model's order, which fixes the latent vector's layout

        @jax.jit
        def unconstrained(values: list[Any]) -> tuple[list[jax.Array], jax.Array]:
            locs = [
                biject_to(sites[n][0].support).inv(v) for n, v in zip(names, values, strict=True)
            ]
            return locs, _ravel_dict(dict(zip(names, locs, strict=True)))[0]

        # One compiled call, concrete even while jit traces the guide's first call.
        # (Lists, not dicts, through jit: a dict comes back with its keys sorted.)
        with jax.ensure_compile_time_eval():
            locs, self._init_latent = unconstrained([sites[name][1] for name in names])
        self._init_locs = dict(zip(names, locs, strict=True))
        shape_dict = {name: jnp.shape(loc) for name, loc in self._init_locs.items()}
        self._unpack_latent = UnpackTransform(
            partial(_unravel_dict, shape_dict=shape_dict), _ravel_dict_with_shape_dict
        )
        self.latent_dim = int(self._init_latent.size)
        self.prototype_trace = {
            name: {"name": name, "type": "sample", "is_observed": False, "fn": site}
            for name, (site, _) in sites.items()
        }

    def _unpack_and_constrain(
        self, latent_sample: jax.Array, params: dict[str, jax.Array]
    ) -> dict[str, jax.Array]:
        """Every latent site's constrained value: its support's bijection of the
        unpacked latent, any leading sample axes. (numpyro's runs the whole model,
        the likelihood of all evidence included, once per draw to do the same.)"""
        return {
            name: biject_to(self.prototype_trace[name]["fn"].support)(value)
            for name, value in self._unpack_latent(latent_sample).items()
        }

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


class OrderedTraceELBO(ELBO):
    """numpyro's Trace_ELBO, its per-site terms computed and summed in a fixed order.

    numpyro's builds them in the order of a Python set of site names, which follows
    the process's string-hash seed: each process traced a differently ordered
    program, so JAX's persistent compilation cache never found an earlier run's SVI
    step, and the sum's rounding differed in the last bits from run to run. The
    arithmetic is numpyro's (``compute_log_probs`` of the seeded guide and of the
    model replayed on its trace; keys split as Trace_ELBO splits them), with the
    sites in sorted order and without its model-guide validation warnings.
    """

    def loss_with_mutable_state(
        self, rng_key: jax.Array, param_map: dict[str, jax.Array], model, guide, *args, **kwargs
    ) -> dict[str, Any]:
        def particle_elbo(key: jax.Array) -> jax.Array:
            model_seed, guide_seed = jax.random.split(key)
            guide_lp, guide_trace = compute_log_probs(
                handlers.seed(guide, guide_seed), args, kwargs, param_map
            )
            replayed = handlers.replay(handlers.seed(model, model_seed), guide_trace)
            model_lp, _ = compute_log_probs(replayed, args, kwargs, param_map)
            zero = jnp.array(0.0)
            terms = (
                model_lp.get(name, zero) - guide_lp.get(name, zero)
                for name in sorted(set(model_lp) | set(guide_lp))
            )
            return sum(terms, start=zero)

        if self.num_particles == 1:
            elbo = particle_elbo(rng_key)
        else:
            keys = jax.random.split(rng_key, self.num_particles)
            elbo = jnp.mean(jax.vmap(particle_elbo)(keys))
        return {"loss": -elbo, "mutable_state": None}


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


def _initial_values(config: ModelConfig) -> dict[str, np.ndarray]:
    """Start at a plausible point in standardised units (outcome sd ≈ 1). NumPy,
    not jax arrays: building these eagerly would compile each one."""
    values = {"mu": np.zeros(2)}
    if config.family == "gaussian":
        values["sigma"] = np.asarray(0.5)
    if config.fixed_effect_scale is None:
        values.update(tau=np.array([0.5, 0.3]), L_omega=np.eye(2))
    else:
        values["tau_intercept"] = np.asarray(0.5)
    if config.time_trend:
        values["gamma"] = np.zeros(config.fixed_dim)
    if config.cohort_level:
        values["tau_cohort"] = np.asarray(0.1)
    if config.num_covariates:
        values["coef"] = np.zeros((2, config.num_covariates))
        smooth = spline_blocks(config.covariates)
        if smooth:
            values["smooth_sd"] = np.full((2, len(smooth)), 0.3)
    if config.grouping_levels:
        values["tau_groups"] = np.full(len(config.grouping_levels), 0.1)
    return values


class PopulationFitter:
    """Static configuration of the variational fit; all state is in FitState.

    Every computation is one jitted call: ``init`` (the initial variational
    parameters), each chunk of ``update`` (re-anchoring and CHUNK_STEPS steps) and
    ``draws``. A fitter compiles each once per padded evidence shape (and draw
    count); ``trace_count`` counts the traces of the chunk, so a test can see a
    recompilation.
    """

    def __init__(
        self,
        config: ModelConfig,
        svi_config: SVIConfig | None = None,
        export_cache: ExportCache | None = None,
        *,
        model: Callable[..., None] = hyper_model,
        initial_values: dict[str, np.ndarray] | None = None,
        from_sites: Callable[[dict[str, jax.Array], Any], Any] = hyper_from_sites,
    ) -> None:
        """``model``, ``initial_values`` and ``from_sites`` swap in another model
        over θ with hyper_model's signature (model.joint's several measures): its
        numpyro model, a starting value for every latent site and the map from
        sample sites to the θ that ``draws`` returns. ``config`` is then that
        model's (it needs num_covariates and grouping_levels, for the checks)."""
        self.config = config
        self._model = model
        self._from_sites = from_sites
        self.svi_config = svi_config or SVIConfig()
        #: Traced programs kept across processes (model.exported), or None: trace here.
        self.export_cache = export_cache
        self._evidence_spec: tuple | None = None  # abstract fit_args of the last init
        self.guide = AnchoredMultivariateNormal(
            model,
            init_loc_fn=init_to_value(values=initial_values or _initial_values(config)),
            init_scale=0.05,
        )
        self._fresh = self._build_svi(self.svi_config.fresh_steps, self.svi_config.num_particles)
        self._warm = self._build_svi(self.svi_config.update_steps, self.svi_config.update_particles)
        self._init_state = jax.jit(self._initial_svi_state, static_argnums=(3, 6))
        self._draws = jax.jit(self._sample_draws, static_argnums=2)
        self._params = jax.jit(lambda svi_state: self._warm[0].get_params(svi_state))
        self.trace_count = 0  # incremented at trace time: a recompilation shows here

    def _build_svi(self, steps: int, num_particles: int) -> tuple[SVI, Callable]:
        lr = self.svi_config.learning_rate
        decay = FINAL_LEARNING_RATE_RATIO ** (1.0 / max(steps, 1))

        def schedule(step: jax.Array) -> jax.Array:
            return lr * decay ** jnp.minimum(step, steps)

        svi = SVI(
            self._model,
            self.guide,
            numpyro.optim.Adam(schedule),
            OrderedTraceELBO(num_particles=num_particles),
        )

        def run_chunk(
            svi_state: SVIState,
            restart_schedule,
            gram,
            cohort,
            num_cohorts,
            covariates,
            groups,
            num_groups,
        ):
            self.trace_count += 1
            svi_state = self._reanchor(svi, svi_state, restart_schedule)
            # One patients-last copy of the evidence per chunk: inside the steps each
            # Gram entry is then a contiguous row, so the likelihood's loops over
            # patients read 1/d² of the memory a strided (P, d, d) slice touches.
            by_entry = jnp.moveaxis(gram, 0, -1)

            def body(state, _):
                patients_first = jnp.moveaxis(by_entry, -1, 0)  # a view, fused into readers
                state, loss = svi.update(
                    state,
                    patients_first,
                    cohort,
                    num_cohorts,
                    self.config,
                    covariates,
                    groups,
                    num_groups,
                )
                return state, loss

            return jax.lax.scan(body, svi_state, None, length=CHUNK_STEPS)

        return svi, jax.jit(run_chunk, static_argnums=(4, 7))

    def _initial_svi_state(
        self, rng_key, gram, cohort, num_cohorts, covariates, groups, num_groups
    ) -> SVIState:
        fresh, warm = self._fresh[0], self._warm[0]
        svi_state = fresh.init(
            rng_key, gram, cohort, num_cohorts, self.config, covariates, groups, num_groups
        )
        # Both SVI objects (fresh and warm schedules) share the guide, hence its
        # params and their constraints: the warm one takes the fresh one's map to
        # constrained space instead of tracing the model a second time.
        warm.constrain_fn = fresh.constrain_fn
        return svi_state

    def _check_evidence(self, evidence: Evidence) -> None:
        width = 0 if evidence.covariates is None else evidence.covariates.shape[-1]
        if width != self.config.num_covariates:
            raise ValueError(
                f"the evidence has {width} patient covariate columns; the model has "
                f"{self.config.num_covariates} ({', '.join(self.config.covariates) or 'none'})"
            )
        levels = len(evidence.num_groups)
        if levels != len(self.config.grouping_levels):
            raise ValueError(
                f"the evidence has {levels} further grouping level(s); the model has "
                f"{len(self.config.grouping_levels)} "
                f"({', '.join(self.config.grouping_levels) or 'none'})"
            )

    def init(self, rng_key: jax.Array, evidence: Evidence) -> FitState:
        """Variational parameters at their initial values; no steps taken yet."""
        self._check_evidence(evidence)
        gram, cohort, num_cohorts, covariates, groups, num_groups = evidence.fit_args
        self._evidence_spec = (  # its shapes, should a program have to be traced later
            *jax.tree_util.tree_map(
                lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)),
                (gram, cohort),
            ),
            num_cohorts,
            *jax.tree_util.tree_map(
                lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)),
                (covariates, groups),
            ),
            num_groups,
        )

        def init_state(rng_key, gram, cohort, covariates, groups):
            return self._init_state(
                rng_key, gram, cohort, num_cohorts, covariates, groups, num_groups
            )

        svi_state = self._through("init", init_state, evidence)(
            rng_key, gram, cohort, covariates, groups
        )
        return FitState(svi_state, 0, 0)

    def _through(self, name: str, fn: Callable, evidence: Evidence | None = None) -> Callable:
        """``fn`` through the export cache (model.exported), if there is one. Its key
        holds the configs and the evidence's static counts; on a miss the guide is
        set up first (its set-up is a side effect of tracing ``init``, which a
        cached ``init`` did not do in this process)."""
        static = (self.config, self.svi_config)
        if evidence is not None:
            static = (*static, evidence.num_cohorts, tuple(evidence.num_groups))
        return through(self.export_cache, f"population.{name}", fn, static, self._set_up)

    def _set_up(self) -> None:
        """Set up the guide and the SVI objects' maps to constrained space, as a
        trace of ``init`` does, by an abstract trace of it (nothing compiled)."""
        if (
            self.guide.prototype_trace is not None
            and self._fresh[0].constrain_fn is not None
            and self._warm[0].constrain_fn is not None
        ):
            return
        if self._evidence_spec is None:
            raise RuntimeError("PopulationFitter.init must come first")
        gram, cohort, num_cohorts, covariates, groups, num_groups = self._evidence_spec

        def init_state(rng_key, gram, cohort, covariates, groups):
            return self._initial_svi_state(
                rng_key, gram, cohort, num_cohorts, covariates, groups, num_groups
            )

        key = jax.ShapeDtypeStruct((2,), jnp.uint32)
        jax.eval_shape(init_state, key, gram, cohort, covariates, groups)

    def resume(
        self,
        initial: FitState,
        loc: jax.Array,
        scale_tril: jax.Array,
        *,
        total_steps: int,
        version: int,
    ) -> FitState:
        """A fit state whose q is N(loc, scale_tril scale_trilᵀ) over the
        unconstrained θ (as published: PopulationPosterior.unconstrained_loc and
        unconstrained_scale_tril), so the next ``update`` is a warm one from there:
        a worker that takes over a measure continues the last posterior instead
        of a cold ``fresh_steps`` fit. ``initial``: this fitter's ``init`` state
        (its guide set up). Raises ValueError when the published q has another
        dimension than this fitter's guide (another model structure)."""
        loc = jnp.asarray(loc, dtype=float)
        scale_tril = jnp.asarray(scale_tril, dtype=float)
        self._set_up()
        dim = self.guide.latent_dim
        if loc.shape != (dim,) or scale_tril.shape != (dim, dim):
            raise ValueError(
                f"a published q of dimension {loc.shape} cannot continue a fit of dimension {dim}"
            )
        p = self.guide.prefix
        unconstrained = {
            f"{p}_anchor_loc": loc,
            f"{p}_anchor_scale_tril": scale_tril,
            f"{p}_loc": jnp.zeros(dim),
            f"{p}_scale_tril": biject_to(self.guide.scale_tril_constraint).inv(jnp.identity(dim)),
        }
        optim_state = self._warm[0].optim.init(unconstrained)
        svi_state = initial.svi_state._replace(optim_state=optim_state)
        return FitState(svi_state, max(total_steps, 1), version)

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
        self._check_evidence(evidence)
        fresh = state.total_steps == 0
        _, jitted_chunk = self._fresh if fresh else self._warm
        gram, cohort, num_cohorts, covariates, groups, num_groups = evidence.fit_args

        def chunk(svi_state, restart_schedule, gram, cohort, covariates, groups):
            return jitted_chunk(
                svi_state,
                restart_schedule,
                gram,
                cohort,
                num_cohorts,
                covariates,
                groups,
                num_groups,
            )

        cached_chunk = self._through("fresh_chunk" if fresh else "warm_chunk", chunk, evidence)
        if steps is None:
            steps = self.svi_config.fresh_steps if fresh else self.svi_config.update_steps
        num_chunks = max(1, math.ceil(steps / CHUNK_STEPS))
        svi_state = state.svi_state._replace(rng_key=rng_key)
        chunk_losses = []
        for done in range(num_chunks):
            svi_state, losses = cached_chunk(svi_state, done == 0, gram, cohort, covariates, groups)
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

    def _reanchor(self, svi: SVI, svi_state: SVIState, restart_schedule: jax.Array) -> SVIState:
        """Fold the trained part of the guide into its anchor; reset Adam's moments
        (and the step count of the learning-rate schedule when ``restart_schedule``)."""
        step, _ = svi_state.optim_state
        step_init, optim_state = svi.optim.init(self.guide.reanchored(svi.get_params(svi_state)))
        return SVIState(
            (jnp.where(restart_schedule, step_init, step), optim_state),
            svi_state.mutable_state,
            svi_state.rng_key,
        )

    def params(self, state: FitState) -> dict[str, jax.Array]:
        """Constrained variational parameters (loc, scale_tril) of the guide."""
        return self._through("params", self._params)(state.svi_state)

    def _sample_draws(self, svi_state: SVIState, rng_key: jax.Array, num_draws: int) -> Hyper:
        params = self._warm[0].get_params(svi_state)
        sites = self.guide.sample_posterior(rng_key, params, sample_shape=(num_draws,))
        return self._from_sites(sites, self.config)

    def draws(self, state: FitState, rng_key: jax.Array, num_draws: int | None = None) -> Hyper:
        """``num_draws`` draws of θ from q, with a leading draw axis. Fixed by the key:
        derive the key from the population version so scores are reproducible."""
        num_draws = num_draws or self.svi_config.num_draws

        def sample(svi_state, rng_key):
            return self._draws(svi_state, rng_key, num_draws)

        return self._through(f"draws_{num_draws}", sample)(state.svi_state, rng_key)
