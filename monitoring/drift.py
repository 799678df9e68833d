"""Drift statistics of the population posterior: pure numpy, no Kafka, no I/O.

Three detectors, each with river's shape (``update(...)`` and a read-only
``drift_detected`` property; the state resets on the update after a detection,
as river's detectors do):

- ``PosteriorShiftDetector``: successive population posteriors q(θ) (full-rank
  Gaussians over the unconstrained θ, given by ``loc`` and ``scale_tril``) are
  compared with a *reference* posterior, the one in force at the last detection
  (the version every patient's score was last recomputed under). It reports
  KL(q_new ‖ q_ref) and the shift of the population effect in reference-posterior
  sds, and detects when either crosses its threshold.
- ``PriorDataConflictDetector``: a two-sided CUSUM over standardised
  posterior-predictive residuals z = (y − E[y]) / sd[y] of incoming observations.
- ``WindowShiftDetector``: a recent-window (fast forgetting) fit of the population
  effect against the all-time fit, difference in combined posterior sds.

Thresholds live in ``DriftConfig``; its defaults are justified in the field docs.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from numpy.typing import ArrayLike
from pydantic import BaseModel, ConfigDict, Field


class DriftConfig(BaseModel):
    """Thresholds of the drift detectors (all configurable; defaults documented)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kl_threshold: float = Field(
        default=12.0,
        gt=0,
        description=(
            "Alert when the location part of KL(q_new ‖ q_ref), ½ Mahalanobis² of the mean "
            "move under the reference covariance, exceeds this (nats). Under stationarity "
            "and exact Bayes the mean move is N(0, Σ_ref − Σ_new), so ½ Mahalanobis² is "
            "stochastically below ½ χ²_d: P(χ²_8 > 24) = 0.2% per comparison for d = 8 "
            "(cohort level, no trend), 0.4% for d = 9."
        ),
    )
    rescore_kl_threshold: float = Field(
        default=1.0,
        gt=0,
        description=(
            "Rescore every patient when the full KL(q_new ‖ q_ref) exceeds this (nats), "
            "even without an alert: the covariance part 0.5·Σ(r − 1 − ln r) over variance "
            "ratios r grows as the posterior contracts, and by 1 nat the population "
            "posterior has sharpened enough that scores computed under the reference "
            "are out of date. Also refreshes the reference, so the shift statistic "
            "stays measured in sds close to the current ones."
        ),
    )
    shift_threshold: float = Field(
        default=3.5,
        gt=0,
        description=(
            "Alert when |shift_z| exceeds this: the effect's move since the reference, "
            "standardised by the sd of the move that new evidence alone explains. Under "
            "stationarity and exact Bayes the posterior mean is a martingale, "
            "m_new − m_ref ~ N(0, v_ref − v_new), so shift_z ~ N(0, 1): P(|z| > 3.5) = 0.05% "
            "per comparison."
        ),
    )
    innovation_floor: float = Field(
        default=0.05,
        gt=0,
        le=1,
        description=(
            "Floor of (v_ref − v_new) / v_ref in shift_z, so a posterior that barely "
            "contracted (little new evidence, or forgetting λ < 1) is judged against at least "
            "sqrt(0.05) ≈ 0.22 reference sds and SVI jitter alone does not alert."
        ),
    )
    posterior_warmup: int = Field(
        default=2,
        ge=0,
        description=(
            "First posteriors that only set the reference: the earliest fits move away from "
            "the prior by construction and are not drift."
        ),
    )
    effect_index: int = Field(
        default=1,
        ge=0,
        description=(
            "Index of the population effect μ_b in the unconstrained latent vector of q(θ). "
            "numpyro's AutoMultivariateNormal flattens sample sites in model order and the "
            "model's first site is mu = (intercept, effect), hence 1."
        ),
    )
    window_shift_threshold: float = Field(
        default=3.0,
        gt=0,
        description=(
            "|recent − all-time effect| in combined sds sqrt(sd_recent² + sd_all²). The "
            "recent data are part of the all-time data, so under stationarity the true sd "
            "of the difference is sqrt(v_recent − v_all) < the combined sd: conservative."
        ),
    )
    conflict_allowance: float = Field(
        default=0.5,
        ge=0,
        description=(
            "CUSUM reference value k, in z units: tuned to detect a mean shift of 2k = 1 "
            "predictive sd fastest (Page 1954)."
        ),
    )
    conflict_threshold: float = Field(
        default=10.0,
        gt=0,
        description=(
            "CUSUM decision interval h, in z units. Siegmund's approximation gives an in-control "
            "average run length ≈ (e^{2kb} − 2kb − 1)/(2k²) with b = h + 1.166, ≈ 1.4·10⁵ "
            "observations per side for k = 0.5, h = 10, and a detection delay ≈ b/(δ − k) ≈ 22 "
            "observations for a shift of δ = 1 sd."
        ),
    )
    conflict_clip: float = Field(
        default=4.0,
        gt=0,
        description=(
            "|z| is clipped to this before the CUSUM, so a single implausible reading can "
            "raise the statistic by at most clip − k and never alarms alone."
        ),
    )
    conflict_warmup: int = Field(
        default=50,
        ge=0,
        description=(
            "Observations ignored after start and after every detection, while the "
            "posterior predictive is still settling."
        ),
    )
    conflict_readings_per_step: int = Field(
        default=500,
        ge=1,
        description=(
            "Most readings of one step of the patients agent whose residual the check "
            "computes: of a step with more, every ⌈n / this⌉-th (evenly spaced, so across "
            "its patients). A residual costs about as much as scoring a patient; a live "
            "worker's steps are smaller and check every reading, a backlog's are sampled."
        ),
    )


_DEFAULTS = DriftConfig()


class GaussianSummary(NamedTuple):
    """Posterior mean and sd of one scalar (here: the population effect)."""

    mean: float
    sd: float


def _as_gaussian(loc: ArrayLike, scale_tril: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Validate (loc, L): loc of shape (d,), L lower-triangular (d, d) with positive diagonal."""
    mean = np.asarray(loc, dtype=float)
    tril = np.asarray(scale_tril, dtype=float)
    if mean.ndim != 1 or tril.shape != (mean.size, mean.size):
        raise ValueError(f"loc {mean.shape} and scale_tril {tril.shape} do not match")
    if np.any(np.triu(tril, 1) != 0):
        raise ValueError("scale_tril must be lower-triangular")
    if np.any(np.diag(tril) <= 0):
        raise ValueError("scale_tril must have a positive diagonal")
    return mean, tril


def gaussian_kl(
    loc_p: ArrayLike, scale_tril_p: ArrayLike, loc_q: ArrayLike, scale_tril_q: ArrayLike
) -> float:
    """KL(p ‖ q) in nats between p = N(m_p, L_p L_pᵀ) and q = N(m_q, L_q L_qᵀ).

        KL = ½ [ ‖L_q⁻¹ L_p‖²_F + ‖L_q⁻¹ (m_q − m_p)‖² − d + 2 Σ ln diag L_q − 2 Σ ln diag L_p ]

    i.e. ½[tr(Σ_q⁻¹ Σ_p) + Mahalanobis² − d + ln det Σ_q − ln det Σ_p], computed from
    the Cholesky factors without forming or inverting a covariance.
    """
    m_p, l_p = _as_gaussian(loc_p, scale_tril_p)
    m_q, l_q = _as_gaussian(loc_q, scale_tril_q)
    if m_p.shape != m_q.shape:
        raise ValueError(f"dimensions differ: {m_p.shape} vs {m_q.shape}")
    trace_term = float(np.sum(np.linalg.solve(l_q, l_p) ** 2))
    mahalanobis = float(np.sum(np.linalg.solve(l_q, m_q - m_p) ** 2))
    log_det_ratio = 2.0 * float(np.sum(np.log(np.diag(l_q))) - np.sum(np.log(np.diag(l_p))))
    return 0.5 * (trace_term + mahalanobis - m_p.size + log_det_ratio)


def marginal(loc: ArrayLike, scale_tril: ArrayLike, index: int) -> GaussianSummary:
    """Marginal mean and sd of coordinate ``index``: sd = ‖row ``index`` of L‖₂."""
    mean, tril = _as_gaussian(loc, scale_tril)
    return GaussianSummary(float(mean[index]), float(np.linalg.norm(tril[index])))


def effect_shift(reference: GaussianSummary, current: GaussianSummary) -> float:
    """Shift of the effect in reference-posterior sds: (m_cur − m_ref) / sd_ref."""
    return (current.mean - reference.mean) / reference.sd


def window_shift(recent: GaussianSummary, all_time: GaussianSummary) -> float:
    """Recent-window minus all-time effect in combined sds:

        (m_recent − m_all) / sqrt(sd_recent² + sd_all²)

    The combined sd treats the two fits as independent; they share data, so the
    statistic is conservative (its stationary sd is below 1).
    """
    return (recent.mean - all_time.mean) / math.hypot(recent.sd, all_time.sd)


def standardised_residual(y: float, predictive_mean: float, predictive_sd: float) -> float:
    """z = (y − E[y]) / sd[y] under the posterior predictive (N(0, 1) without conflict)."""
    if predictive_sd <= 0:
        raise ValueError("predictive_sd must be positive")
    return (y - predictive_mean) / predictive_sd


class PosteriorShiftDetector:
    """Has q(θ) drifted, or moved materially, since the reference posterior?

    ``update(loc, scale_tril)`` with each new population posterior. The first
    ``warmup`` posteriors only become the reference. Afterwards, against the
    reference q_ref = N(m_r, Σ_r), with the effect's marginal means e and variances v:

    - ``kl`` = KL(q_new ‖ q_ref), split into ``kl_location`` = ½ (m_new − m_r)ᵀ Σ_r⁻¹
      (m_new − m_r) and the covariance part ``kl - kl_location`` (which grows as the
      posterior merely contracts with more data);
    - ``shift`` = (e_new − e_ref) / sqrt(v_ref): the move in reference-posterior sds
      (what the ``efficacy_drift_effect_shift_sd_units`` gauge shows);
    - ``shift_z`` = (e_new − e_ref) / sqrt(max(v_ref − v_new, floor · v_ref)): the
      move in sds of what the new evidence explains (N(0, 1) without drift, because
      a posterior mean is a martingale).

    ``drift_detected`` (an alert) is ``kl_location > kl_threshold or |shift_z| >
    shift_threshold``: the location moved beyond what accumulating evidence
    explains. ``moved`` (rescore every patient) is ``drift_detected or kl >
    rescore_kl_threshold``. On the next update after ``moved``, the posterior that
    triggered it becomes the reference: it is the version every score was then
    recomputed under, and refreshing keeps the reference sd close to the current one
    so the shift keeps its sensitivity.
    """

    def __init__(
        self,
        kl_threshold: float = _DEFAULTS.kl_threshold,
        shift_threshold: float = _DEFAULTS.shift_threshold,
        *,
        rescore_kl_threshold: float = _DEFAULTS.rescore_kl_threshold,
        innovation_floor: float = _DEFAULTS.innovation_floor,
        effect_index: int = _DEFAULTS.effect_index,
        warmup: int = _DEFAULTS.posterior_warmup,
    ) -> None:
        if min(kl_threshold, shift_threshold, rescore_kl_threshold) <= 0:
            raise ValueError("thresholds must be positive")
        if not 0 < innovation_floor <= 1:
            raise ValueError("innovation_floor must be in (0, 1]")
        if warmup < 0 or effect_index < 0:
            raise ValueError("warmup and effect_index must be non-negative")
        self.kl_threshold = kl_threshold
        self.shift_threshold = shift_threshold
        self.rescore_kl_threshold = rescore_kl_threshold
        self.innovation_floor = innovation_floor
        self.effect_index = effect_index
        self.warmup = warmup
        self.n_updates = 0
        self.kl = 0.0
        self.kl_location = 0.0
        self.shift = 0.0
        self.shift_z = 0.0
        self._reference: tuple[np.ndarray, np.ndarray] | None = None
        self._last: tuple[np.ndarray, np.ndarray] | None = None
        self._drift_detected = False
        self._moved = False

    @classmethod
    def from_config(cls, config: DriftConfig) -> PosteriorShiftDetector:
        return cls(
            config.kl_threshold,
            config.shift_threshold,
            rescore_kl_threshold=config.rescore_kl_threshold,
            innovation_floor=config.innovation_floor,
            effect_index=config.effect_index,
            warmup=config.posterior_warmup,
        )

    @property
    def drift_detected(self) -> bool:
        """The last update's posterior drifted from the reference (publish an alert)."""
        return self._drift_detected

    @property
    def moved(self) -> bool:
        """The last update moved q(θ) materially (rescore and republish every patient)."""
        return self._moved

    @property
    def reference(self) -> GaussianSummary | None:
        """The reference posterior's effect marginal (None before the first update)."""
        if self._reference is None:
            return None
        return marginal(*self._reference, self.effect_index)

    def update(self, loc: ArrayLike, scale_tril: ArrayLike) -> None:
        posterior = _as_gaussian(loc, scale_tril)
        if self._moved:
            self._reference = self._last
        self._drift_detected = self._moved = False
        self.n_updates += 1
        self._last = posterior
        if self._reference is None or self.n_updates <= self.warmup:
            self._reference = posterior
            self.kl = self.kl_location = self.shift = self.shift_z = 0.0
            return
        ref_loc, ref_tril = self._reference
        if posterior[0].shape != ref_loc.shape:
            raise ValueError(f"dimension changed: {ref_loc.shape} -> {posterior[0].shape}")
        self.kl = gaussian_kl(*posterior, *self._reference)
        self.kl_location = 0.5 * float(
            np.sum(np.linalg.solve(ref_tril, posterior[0] - ref_loc) ** 2)
        )
        ref = marginal(*self._reference, self.effect_index)
        new = marginal(*posterior, self.effect_index)
        self.shift = effect_shift(ref, new)
        innovation_var = max(ref.sd**2 - new.sd**2, self.innovation_floor * ref.sd**2)
        self.shift_z = (new.mean - ref.mean) / math.sqrt(innovation_var)
        self._drift_detected = (
            self.kl_location > self.kl_threshold or abs(self.shift_z) > self.shift_threshold
        )
        self._moved = self._drift_detected or self.kl > self.rescore_kl_threshold


class PriorDataConflictDetector:
    """Two-sided CUSUM (Page 1954) over standardised predictive residuals z_t.

        S⁺_t = max(0, S⁺_{t−1} + c(z_t) − k),   S⁻_t = max(0, S⁻_{t−1} − c(z_t) − k)

    with c the clip to [−clip, clip]; drift when max(S⁺, S⁻) > h. The first
    ``warmup`` residuals after start and after each detection are ignored.
    ``direction`` is +1 when observations run above the prediction, −1 below.
    """

    def __init__(
        self,
        threshold: float = _DEFAULTS.conflict_threshold,
        allowance: float = _DEFAULTS.conflict_allowance,
        *,
        clip: float = _DEFAULTS.conflict_clip,
        warmup: int = _DEFAULTS.conflict_warmup,
    ) -> None:
        if threshold <= 0 or allowance < 0 or clip <= 0 or warmup < 0:
            raise ValueError("threshold and clip must be positive, allowance and warmup >= 0")
        self.threshold = threshold
        self.allowance = allowance
        self.clip = clip
        self.warmup = warmup
        self._reset()

    @classmethod
    def from_config(cls, config: DriftConfig) -> PriorDataConflictDetector:
        return cls(
            config.conflict_threshold,
            config.conflict_allowance,
            clip=config.conflict_clip,
            warmup=config.conflict_warmup,
        )

    def _reset(self) -> None:
        self.upper = 0.0
        self.lower = 0.0
        self.n_seen = 0
        self._drift_detected = False

    @property
    def drift_detected(self) -> bool:
        return self._drift_detected

    @property
    def statistic(self) -> float:
        """max(S⁺, S⁻): the value exported as ``efficacy_drift_conflict_statistic``."""
        return max(self.upper, self.lower)

    @property
    def direction(self) -> int:
        """+1 if S⁺ ≥ S⁻ (observations above the prediction), else −1."""
        return 1 if self.upper >= self.lower else -1

    def update(self, z: float) -> None:
        if self._drift_detected:
            self._reset()
        if not math.isfinite(z):
            raise ValueError(f"residual must be finite, got {z}")
        self.n_seen += 1
        if self.n_seen <= self.warmup:
            return
        clipped = min(max(z, -self.clip), self.clip)
        self.upper = max(0.0, self.upper + clipped - self.allowance)
        self.lower = max(0.0, self.lower - clipped - self.allowance)
        self._drift_detected = self.statistic > self.threshold


class WindowShiftDetector:
    """Recent-window fit of the effect against the all-time fit.

    ``update(recent, all_time)`` with the two effect summaries after each
    population update. ``statistic`` is ``window_shift``. ``drift_detected`` on
    the update where |statistic| first exceeds ``threshold`` (an alert); the
    detector then disarms until |statistic| falls below ``rearm`` (half the
    threshold by default), so one lasting departure raises one alert rather than
    one per population update. The first ``warmup`` updates only set the level.
    """

    def __init__(
        self,
        threshold: float = _DEFAULTS.window_shift_threshold,
        *,
        rearm: float | None = None,
        warmup: int = _DEFAULTS.posterior_warmup,
    ) -> None:
        rearm = threshold / 2.0 if rearm is None else rearm
        if threshold <= 0 or not 0 <= rearm <= threshold or warmup < 0:
            raise ValueError("need threshold > 0, 0 <= rearm <= threshold and warmup >= 0")
        self.threshold = threshold
        self.rearm = rearm
        self.warmup = warmup
        self.statistic = 0.0
        self.n_updates = 0
        self._armed = True
        self._drift_detected = False

    @classmethod
    def from_config(cls, config: DriftConfig) -> WindowShiftDetector:
        return cls(config.window_shift_threshold, warmup=config.posterior_warmup)

    @property
    def drift_detected(self) -> bool:
        return self._drift_detected

    def update(self, recent: GaussianSummary, all_time: GaussianSummary) -> None:
        self.n_updates += 1
        self.statistic = window_shift(recent, all_time)
        beyond = abs(self.statistic) > self.threshold
        self._drift_detected = beyond and self._armed and self.n_updates > self.warmup
        if self._drift_detected:
            self._armed = False
        elif abs(self.statistic) < self.rearm:
            self._armed = True
