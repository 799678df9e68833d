"""Configuration of one outcome measure's model: what is measured, the priors,
the standardisation of raw values, and the variational fit.

All configs are frozen pydantic models so they can be hashed and passed as
static arguments to jit-compiled functions.

Units. The model works on *standardised* values, so priors mean the same thing
for every measure::

    y' = (y - outcome_location) / outcome_scale
    x' = x / exposure_scale
    t' = (t - time_location) / time_scale
    c' = (c - location_k) / scale_k      (each patient or time-varying covariate k)

An effect b' in standardised units is ``b' * outcome_scale / exposure_scale``
in the measure's unit per unit of exposure (``Standardization.effect_to_raw``).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from model.splines import SplineBasis


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


#: Cell statistics per patient of a Bernoulli or Poisson measure: (n_0, s_0,
#: n_1, s_1, k), model.families.
CELLS = 5

#: The scales of a measure's effect and MCID each family may declare, its default
#: first (model.family_scores reads the effect on them).
SCALES: dict[str, tuple[str, ...]] = {
    "gaussian": ("difference",),
    "bernoulli": ("odds_ratio", "risk_difference", "log_odds_ratio"),
    "poisson": ("rate_ratio", "rate_difference", "log_rate_ratio"),
}
RATIO_SCALES = ("odds_ratio", "rate_ratio")
LINK_SCALES = ("log_odds_ratio", "log_rate_ratio")


def default_scale(family: str) -> str:
    return SCALES[family][0]


def check_scale(family: str, scale: str, mcid: float) -> None:
    """ValueError unless ``scale`` is one of the family's and the MCID fits it."""
    if scale not in SCALES[family]:
        raise ValueError(
            f"a {family} measure's effect scale is one of {', '.join(SCALES[family])}, "
            f"not {scale!r}"
        )
    if scale in RATIO_SCALES and mcid < 1.0:
        raise ValueError(f"the MCID on the {scale} scale is a ratio >= 1, got {mcid:g}")
    if scale == "risk_difference" and mcid > 1.0:
        raise ValueError(f"the MCID on the risk_difference scale is <= 1, got {mcid:g}")


class MeasureConfig(_Frozen):
    """One outcome measure: its unit, which direction is better, and the MCID.

    ``direction="lower"`` means a *decrease* in the outcome is a benefit (resting
    heart rate, HbA1c, PHQ-9); the benefit of an effect b is then -b.

    ``family`` is the outcome's distribution (ModelConfig.family) and
    ``effect_scale`` the scale its effect and MCID are read on: a difference in
    the measure's unit for Gaussian measures; odds ratio, risk difference or log
    odds ratio for Bernoulli; rate ratio, rate difference or log rate ratio for
    Poisson (model.family_scores).
    """

    name: str
    unit: str
    direction: Literal["higher", "lower"] = "higher"
    mcid: float = Field(ge=0.0, description="minimal clinically important difference, raw units")
    plausible_range: tuple[float, float] = (-np.inf, np.inf)
    weight: float = Field(default=1.0, ge=0.0, description="weight in the composite score")
    family: Literal["gaussian", "bernoulli", "poisson"] = "gaussian"
    effect_scale: str | None = Field(
        default=None,
        description="scale of the effect and MCID (model.family_scores.SCALES); "
        "None: the family's default (difference, odds_ratio, rate_ratio)",
    )

    @model_validator(mode="after")
    def _range_ordered(self) -> MeasureConfig:
        low, high = self.plausible_range
        if not low < high:
            raise ValueError(f"plausible_range must have low < high, got {self.plausible_range}")
        if self.effect_scale is not None or self.family != "gaussian":
            check_scale(self.family, self.effect_scale or default_scale(self.family), self.mcid)
        return self

    @property
    def benefit_sign(self) -> float:
        """+1 when higher is better, -1 when lower is better: benefit = sign * effect."""
        return 1.0 if self.direction == "higher" else -1.0


class Standardization(_Frozen):
    """Affine map from raw (outcome, exposure, time, covariates) to the model's units.

    Covariate columns (patient covariates and time-varying ones, categorical
    levels as 0/1 indicator columns) have one location and scale each; empty
    tuples leave the values as they are (already standardised).
    """

    outcome_location: float = 0.0
    outcome_scale: float = Field(default=1.0, gt=0.0)
    exposure_scale: float = Field(default=1.0, gt=0.0)
    time_location: float = 0.0
    time_scale: float = Field(default=1.0, gt=0.0)
    covariate_location: tuple[float, ...] = ()
    covariate_scale: tuple[float, ...] = ()
    time_covariate_location: tuple[float, ...] = ()
    time_covariate_scale: tuple[float, ...] = ()

    @model_validator(mode="after")
    def _covariate_maps(self) -> Standardization:
        for name in ("covariate", "time_covariate"):
            location = getattr(self, f"{name}_location")
            scale = getattr(self, f"{name}_scale")
            if len(location) != len(scale):
                raise ValueError(f"{name}_location and {name}_scale differ in length")
            if any(not value > 0 for value in scale):
                raise ValueError(f"{name}_scale must be positive")
        return self

    @classmethod
    def from_data(
        cls, outcome: np.ndarray, exposure: np.ndarray, time: np.ndarray | None = None
    ) -> Standardization:
        """Data-derived scaling for offline fits: outcome centred and scaled by its
        sd, exposure scaled by its largest magnitude (a 0/1 exposure stays 0/1),
        time centred and scaled by its sd."""
        outcome = np.asarray(outcome, dtype=float)
        exposure = np.asarray(exposure, dtype=float)
        y_sd = float(np.std(outcome))
        x_max = float(np.max(np.abs(exposure))) if exposure.size else 1.0
        kwargs: dict[str, float] = {
            "outcome_location": float(np.mean(outcome)),
            "outcome_scale": y_sd if y_sd > 0 else 1.0,
            "exposure_scale": x_max if x_max > 0 else 1.0,
        }
        if time is not None:
            time = np.asarray(time, dtype=float)
            t_sd = float(np.std(time))
            kwargs["time_location"] = float(np.mean(time))
            kwargs["time_scale"] = t_sd if t_sd > 0 else 1.0
        return cls(**kwargs)

    def with_covariates(
        self, covariates: np.ndarray | None, time_covariates: np.ndarray | None
    ) -> Standardization:
        """This map plus each covariate column centred and scaled by its sd in the
        data: covariates (P, q) one row per patient, time_covariates (n, k) one
        row per reading (None: none)."""

        def location_scale(values: np.ndarray | None) -> tuple[tuple, tuple]:
            if values is None or np.size(values) == 0:
                return (), ()
            values = np.asarray(values, dtype=float)
            sd = values.std(axis=0)
            return tuple(values.mean(axis=0).tolist()), tuple(np.where(sd > 0, sd, 1.0).tolist())

        loc, scale = location_scale(covariates)
        time_loc, time_scale = location_scale(time_covariates)
        return self.model_copy(
            update={
                "covariate_location": loc,
                "covariate_scale": scale,
                "time_covariate_location": time_loc,
                "time_covariate_scale": time_scale,
            }
        )

    def covariates(self, values: np.ndarray) -> np.ndarray:
        """Patient covariates (…, q) in natural units to standardised ones."""
        return _affine(values, self.covariate_location, self.covariate_scale)

    def time_covariates(self, values: np.ndarray) -> np.ndarray:
        """Time-varying covariates (…, k) in natural units to standardised ones."""
        return _affine(values, self.time_covariate_location, self.time_covariate_scale)

    def apply(
        self, outcome: np.ndarray, exposure: np.ndarray, time: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Raw (outcome, exposure, time) to standardised (y', x', t'). The one place
        this map is written; everything else calls it."""
        y = (np.asarray(outcome, dtype=float) - self.outcome_location) / self.outcome_scale
        x = np.asarray(exposure, dtype=float) / self.exposure_scale
        t = (np.asarray(time, dtype=float) - self.time_location) / self.time_scale
        return y, x, t

    def effect_to_raw(self, effect: np.ndarray | float) -> np.ndarray | float:
        """Exposure effect from standardised units to raw units per unit exposure."""
        return effect * (self.outcome_scale / self.exposure_scale)

    def intercept_to_raw(self, intercept: np.ndarray | float) -> np.ndarray | float:
        return intercept * self.outcome_scale + self.outcome_location

    def trend_to_raw(self, slope: np.ndarray | float) -> np.ndarray | float:
        """Time slope from standardised units to raw outcome units per raw time unit."""
        return slope * (self.outcome_scale / self.time_scale)

    def coefficients_to_raw(self, coef: np.ndarray) -> np.ndarray:
        """B (…, 2, q) to natural units: row 0 in outcome units per covariate unit,
        row 1 (the effect modifiers) in outcome units per unit exposure per
        covariate unit."""
        coef = np.asarray(coef, dtype=float)
        scale = np.asarray(self.covariate_scale or np.ones(coef.shape[-1]), dtype=float)
        rows = np.array([self.outcome_scale, self.outcome_scale / self.exposure_scale])
        return coef * rows[:, None] / scale

    def time_coefficients_to_raw(self, gamma: np.ndarray) -> np.ndarray:
        """Coefficients of the time-varying covariates (…, k) in outcome units per
        covariate unit."""
        gamma = np.asarray(gamma, dtype=float)
        scale = np.asarray(self.time_covariate_scale or np.ones(gamma.shape[-1]), dtype=float)
        return gamma * self.outcome_scale / scale


def _affine(
    values: np.ndarray, location: tuple[float, ...], scale: tuple[float, ...]
) -> np.ndarray:
    values = np.asarray(values, dtype=float)
    if not location:
        return values
    if values.shape[-1] != len(location):
        raise ValueError(f"expected {len(location)} covariate columns, got {values.shape[-1]}")
    return (values - np.asarray(location)) / np.asarray(scale)


class PriorConfig(_Frozen):
    """Weakly informative priors on the hyperparameters θ, in standardised units
    (outcome sd ≈ 1, so a scale of 1 is "about the spread of the data").

    - population means μ = (intercept, effect) ~ Normal(0, population_mean_sd²)
    - between-patient scales of (intercept, effect) ~ HalfNormal(patient_scale)
    - correlation of (intercept, effect) ~ LKJ(lkj_concentration)
    - between-measure correlation of the effects in a joint model (model.joint)
      ~ π LKJ(M, effect_correlation_spike_concentration) + (1 − π) LKJ(M,
      effect_correlation_concentration), π = effect_correlation_spike_weight: a
      spike at independence (correlation sd 0.10 at 50) next to a diffuse slab
      (0.41 for three measures at 2), so that effects that do not correlate
      pay no Occam price for the slab and effects that do borrow fully
      (benchmarks/README.md §12); π = 0 is the slab alone
    - between-cohort scale of the effect ~ HalfNormal(cohort_scale)
    - residual sd σ ~ HalfNormal(residual_scale)
    - time-trend slope γ ~ Normal(0, trend_sd²)
    - coefficients of time-varying covariates (also in γ) ~ Normal(0, trend_sd²)
    - coefficients B of patient covariates ~ Normal(0, covariate_sd²): covariates
      are standardised (sd 1), so 1 is an outcome sd per covariate sd
    - the spline weights of a smooth covariate (model.smooth) ~ Normal(0, λ²),
      λ ~ HalfNormal(smooth_scale) per row (intercept, effect) and covariate:
      Σ u² = ∫ f''², so λ = 1 allows curvature of about an outcome sd per
      covariate sd²; λ → 0 is the straight line
    """

    population_mean_sd: float = Field(default=3.0, gt=0.0)
    patient_scale: float = Field(default=1.0, gt=0.0)
    lkj_concentration: float = Field(default=2.0, gt=0.0)
    effect_correlation_concentration: float = Field(default=2.0, gt=0.0)
    effect_correlation_spike_weight: float = Field(default=0.2, ge=0.0, lt=1.0)
    effect_correlation_spike_concentration: float = Field(default=50.0, gt=0.0)
    cohort_scale: float = Field(default=0.5, gt=0.0)
    residual_scale: float = Field(default=1.0, gt=0.0)
    trend_sd: float = Field(default=1.0, gt=0.0)
    covariate_sd: float = Field(default=1.0, gt=0.0)
    smooth_scale: float = Field(default=1.0, gt=0.0)


# Fixed between-patient sds of the effect, standardised units (outcome sd ≈ 1).
# 1e-4 is "zero" against any data: with n observations of residual sd σ the
# likelihood of b_i has variance ≳ σ²/n ≫ 1e-8, so the prior variance changes the
# marginal likelihood by a relative 1e-8·n/σ² (kept > 0 so Σ stays invertible).
# 10 is "no borrowing": ten outcome sds is far wider than any plausible effect.
COMPLETE_POOLING_EFFECT_SD = 1e-4
NO_POOLING_EFFECT_SD = 10.0


class ModelConfig(_Frozen):
    """Structure of the hierarchical model.

    Local design w = (1, x): patient intercept a_i and exposure effect b_i (the ITE).
    Population fixed effects z = (t, c_1, …): the time t when ``time_trend``, then
    the readings' ``time_covariates`` (standardised values, named here).
    ``covariates`` names the columns x_i of the patients' standardised
    covariate design (model.covariates): the mean of (a_i, b_i) is μ + B x_i.
    ``cohort_level`` adds cohort deviations u_g of the effect (partial pooling
    across cohorts); switch it off when there is a single cohort, where it is not
    identified. ``grouping_levels`` names further groupings (a genotype cluster,
    a demographic stratum), crossed with the cohorts or nested in them: each
    adds a deviation u_{l, g} ~ N(0, τ_l²) of the effect of its groups' patients
    (τ_l ~ HalfNormal(priors.cohort_scale)), integrated out exactly with the
    cohorts' (model.likelihood, the dense group step); they need the cohort level. ``half_life`` (in raw time units) turns on exponential forgetting
    of old evidence; ``None`` keeps all evidence at full weight.
    ``recent_half_life`` (raw time units) is the fast forgetting of the
    recent-window statistics that drift monitoring fits against the all-time
    ones (``recent_window``); ``None``: no recent window.

    ``effect_pooling`` chooses how patients' effects b_i borrow from each other
    (the intercepts a_i stay partially pooled in every case):

    - ``"partial"`` (default): the between-patient sd τ_b is learned, with the
      (a, b) correlation (the model of the design);
    - ``"complete"``: one effect for everyone (up to cohort deviations), τ_b
      fixed at COMPLETE_POOLING_EFFECT_SD ≈ 0 and (a, b) uncorrelated;
    - ``"none"``: no borrowing, τ_b fixed at NO_POOLING_EFFECT_SD (a prior on b_i
      ten times the outcome sd wide) and (a, b) uncorrelated.

    The last two exist to be compared against the first (model.selection).

    ``splines`` are the bases of the smooth covariates (model.smooth): each
    names a numeric column of ``covariates``, and ``covariates`` end with their
    penalised columns (``<covariate>:s1`` …) in the bases' order. They say how a
    covariate value becomes those columns: the curves are drawn through them
    (model.smooth.curve_summaries), and a patient's design row of the
    covariates' own columns gets them appended (model.covariates.patient_design,
    the stream's rows). The daily cycle needs no field: its Fourier columns
    (``hour:cos1`` …) are time covariates whose values each reading carries.

    ``family`` is the outcome's distribution: ``"gaussian"`` (the model above),
    or ``"bernoulli"`` (0/1, logit link) and ``"poisson"`` (counts, log link),
    whose likelihood is integrated out per patient by a Laplace step
    (model.families); those have no σ, no time trend and no time-varying
    covariates, and their exposure is 0 or 1.
    """

    time_trend: bool = True
    time_covariates: tuple[str, ...] = ()
    covariates: tuple[str, ...] = ()
    cohort_level: bool = True
    grouping_levels: tuple[str, ...] = ()
    half_life: float | None = Field(default=None, gt=0.0)
    recent_half_life: float | None = Field(default=None, gt=0.0)
    effect_pooling: Literal["partial", "complete", "none"] = "partial"
    family: Literal["gaussian", "bernoulli", "poisson"] = "gaussian"
    splines: tuple[SplineBasis, ...] = ()
    priors: PriorConfig = PriorConfig()
    standardization: Standardization = Standardization()

    @model_validator(mode="after")
    def _grouping_levels_need_cohorts(self) -> ModelConfig:
        if self.splines:
            tail = tuple(column for basis in self.splines for column in basis.columns)
            names = {basis.covariate for basis in self.splines}
            if self.covariates[len(self.covariates) - len(tail) :] != tail:
                raise ValueError(f"covariates must end with the splines' columns {tail}")
            if len(names) != len(self.splines) or not names <= set(self.covariates):
                raise ValueError(f"each spline must name a distinct covariate of {self.covariates}")
        if self.grouping_levels and not self.cohort_level:
            raise ValueError("grouping_levels need the cohort level (cohort_level=True)")
        if len(set(self.grouping_levels)) != len(self.grouping_levels):
            raise ValueError(f"grouping_levels repeat a name: {self.grouping_levels}")
        if self.family != "gaussian" and self.fixed_dim:
            raise ValueError(
                f"a {self.family} measure has no time trend or time-varying covariates "
                "(its evidence is cell statistics: model.families)"
            )
        return self

    @property
    def fixed_effect_scale(self) -> float | None:
        """τ_b when effect_pooling fixes it (standardised units), else None."""
        return {
            "partial": None,
            "complete": COMPLETE_POOLING_EFFECT_SD,
            "none": NO_POOLING_EFFECT_SD,
        }[self.effect_pooling]

    @property
    def structure(self) -> ModelConfig:
        """This config with the default standardisation, no forgetting and no
        spline knots: all that the fit and the scores of *standardised* evidence
        depend on (forgetting acts on the evidence, model.evidence, before
        either; the knots make the spline columns' values, which the evidence
        carries). jit-compiled functions take it as their static argument, so
        measures that differ only in units, half-lives or knots share one
        compilation."""
        return self.model_copy(
            update={
                "standardization": Standardization(),
                "half_life": None,
                "recent_half_life": None,
                "splines": (),  # the fit sees the spline columns' values, not the knots
            }
        )

    @property
    def recent_window(self) -> ModelConfig | None:
        """The config of the recent-window statistics: forgetting at
        ``recent_half_life`` (None without a recent window)."""
        if self.recent_half_life is None:
            return None
        return _recent_window(self)

    @property
    def local_dim(self) -> int:
        return 2

    @property
    def fixed_dim(self) -> int:
        return int(self.time_trend) + len(self.time_covariates)

    @property
    def num_covariates(self) -> int:
        return len(self.covariates)

    @property
    def stat_dim(self) -> int:
        """Size of the augmented vector v = (w, z, y)."""
        return self.local_dim + self.fixed_dim + 1

    @property
    def stat_shape(self) -> tuple[int, ...]:
        """One patient's statistics: a (d, d) Gram matrix, or for a Bernoulli or
        Poisson measure its CELLS cell statistics (model.families)."""
        if self.family == "gaussian":
            return (self.stat_dim, self.stat_dim)
        return (CELLS,)


class SVIConfig(_Frozen):
    """Variational fit of q(θ): a full-rank Gaussian over unconstrained θ.

    A fresh fit runs ``fresh_steps`` with ``num_particles`` Monte Carlo draws per
    ELBO gradient; a sequential update continues from the previous variational
    parameters for ``update_steps`` with ``update_particles``. Steps run in chunks
    of 50. The learning rate is in units of the current posterior sd (the guide
    is whitened, see model.population). ``num_draws`` fixed draws of θ from q
    define the patient posteriors (Gaussian mixtures).

    Defaults were tuned against NUTS on the same collapsed model (500 patients,
    20 cohorts): patient effect means within 0.005 NUTS sd, sd ratio 1.00.
    """

    fresh_steps: int = Field(default=1000, ge=1)
    update_steps: int = Field(default=50, ge=1)
    learning_rate: float = Field(default=0.05, gt=0.0)
    num_particles: int = Field(default=8, ge=1)
    update_particles: int = Field(default=1, ge=1)
    num_draws: int = Field(default=400, ge=1)


class DecisionRule(_Frozen):
    """Default responder rule of the design.

    responder when P(benefit ≥ MCID) ≥ responder_probability; non-responder when
    P(benefit > 0) ≤ nonresponder_probability; insufficient data until the patient
    has ``min_unexposed`` and ``min_exposed`` observations; otherwise uncertain.

    Hysteresis (when the previous call is known, as in the stream): a responder
    stays a responder while P(benefit ≥ MCID) ≥ responder_leave_probability, a
    non-responder stays one while P(benefit > 0) ≤ nonresponder_leave_probability,
    so a patient near a threshold does not flip on noise. Set the leave
    probabilities equal to the enter ones for the plain rule.
    """

    responder_probability: float = Field(default=0.8, gt=0.0, lt=1.0)
    nonresponder_probability: float = Field(default=0.2, gt=0.0, lt=1.0)
    responder_leave_probability: float = Field(
        default=0.7,
        gt=0.0,
        lt=1.0,
        description="a responder stays one while P(benefit ≥ MCID) ≥ this (hysteresis)",
    )
    nonresponder_leave_probability: float = Field(
        default=0.3,
        gt=0.0,
        lt=1.0,
        description="a non-responder stays one while P(benefit > 0) ≤ this (hysteresis)",
    )
    min_unexposed: int = Field(default=3, ge=0)
    min_exposed: int = Field(default=3, ge=0)
    version: str = "default-2"

    @model_validator(mode="after")
    def _hysteresis_ordered(self) -> DecisionRule:
        if self.responder_leave_probability > self.responder_probability:
            raise ValueError("responder_leave_probability must be <= responder_probability")
        if self.nonresponder_leave_probability < self.nonresponder_probability:
            raise ValueError("nonresponder_leave_probability must be >= nonresponder_probability")
        return self


#: ModelConfig.recent_window per config object: id -> (config, window). Keyed
#: by identity, not by value: hashing a config (every field, recursively) cost
#: more than the reading the patients agent adds for every call. The config is
#: held, so its id cannot be reused while the entry lives.
_RECENT_WINDOWS: dict[int, tuple[ModelConfig, ModelConfig]] = {}
_RECENT_WINDOWS_KEEP = 256


def _recent_window(config: ModelConfig) -> ModelConfig:
    """ModelConfig.recent_window, made once per config object: the patients
    agent asks for it for every reading and every touched patient and measure."""
    entry = _RECENT_WINDOWS.get(id(config))
    if entry is not None and entry[0] is config:
        return entry[1]
    window = config.model_copy(
        update={"half_life": config.recent_half_life, "recent_half_life": None}
    )
    if len(_RECENT_WINDOWS) >= _RECENT_WINDOWS_KEEP:
        _RECENT_WINDOWS.clear()
    _RECENT_WINDOWS[id(config)] = (config, window)
    return window
