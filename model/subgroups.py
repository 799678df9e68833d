"""Subgroup efficacy: the posterior of the mean effect over a subgroup's patients.

A subgroup S (a cohort, a covariate range, a level, or a combination) is a set
of patients. Its efficacy is their mean effect m_S = (1/|S|) Σ_{i∈S} b_i: what
the intervention did, on average, for the patients of that kind the programme
has. Given θ, every b_i and cohort deviation u_g is jointly Gaussian
(model.likelihood), so m_S | θ, data is Gaussian, exactly:

    b_i = c_i + l_i u_g(i) + e_i,   e_i ~ N(0, M⁻¹_bb,i) independent given u
    E[m_S | θ]   = (1/|S|) Σ_i (c_i + l_i m_g(i))
    Var[m_S | θ] = (1/|S|²) (Σ_i M⁻¹_bb,i + Σ_g v_g (Σ_{i∈S, g(i)=g} l_i)²)

with c_i the conditional mean given u = 0, l_i = (M⁻¹S)_bb, and u_g | θ, data ~
N(m_g, v_g) independent across cohorts. With further grouping levels the
patient's shift is a_iᵀu over every level's groups (model.likelihood), jointly
Gaussian N(m, C) and correlated across levels, so with v = Σ_{i∈S} l_i a_i:

    E[m_S | θ]   = (1/|S|) Σ_i (c_i + l_i a_iᵀm)
    Var[m_S | θ] = (1/|S|²) (Σ_i M⁻¹_bb,i + vᵀ C v)
 Over the fixed draws of θ its posterior
is the equal-weight mixture of those Gaussians, summarised exactly as a
patient's score is (model.scores): mean, sd, central interval, P(benefit ≥ MCID).
Membership is a weight matrix (K, P), so fractional or overlapping subgroups
need nothing special.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import ndtr
from pydantic import BaseModel, ConfigDict, Field

from model.config import DecisionRule, MeasureConfig, ModelConfig
from model.covariates import CovariateSpec
from model.likelihood import (
    Hyper,
    cohort_posterior,
    cohort_sums,
    group_index,
    group_step,
    patient_terms,
)
from model.population import MIN_COHORT_BUCKET, MIN_PATIENT_BUCKET, bucket_size
from model.scores import classify, mixture_quantiles


class SubgroupSummary(NamedTuple):
    """Posterior of each subgroup's mean effect, raw units, shape (K,)."""

    mean: np.ndarray
    sd: np.ndarray
    lower: np.ndarray
    upper: np.ndarray
    p_benefit_ge_mcid: np.ndarray
    p_benefit_gt_0: np.ndarray
    members: np.ndarray  # patients in the subgroup (sum of weights)


@partial(jax.jit, static_argnames=("num_cohorts", "config", "num_groups"))
def subgroup_components(
    draws: Hyper,
    gram: jax.Array,
    cohort: jax.Array,
    num_cohorts: int,
    membership: jax.Array,
    config: ModelConfig,
    covariates: jax.Array | None = None,
    groups: jax.Array | None = None,
    num_groups: tuple[int, ...] = (),
) -> tuple[jax.Array, jax.Array]:
    """(S, K) mean and variance of every subgroup's mean effect under every draw
    (standardised units). membership: (K, P) weights (1: a member), rows with a
    zero sum give nan; groups (P, L), num_groups: the further grouping levels
    (model.likelihood) when the config has them. Draws are mapped sequentially:
    memory O(K·P + G²)."""
    size = jnp.sum(membership, axis=1)

    def one(theta: Hyper) -> tuple[jax.Array, jax.Array]:
        terms = patient_terms(theta, gram, config, covariates)
        load = terms.m_inv_s.d
        mean = terms.cond_mean[1]
        variance = terms.m_inv.d
        if config.grouping_levels:
            where = group_index(cohort, num_cohorts, groups, num_groups)
            step = group_step(theta, terms, where)
            mean = mean + load * sum(
                step.mean[where.index[:, level]] for level in range(len(where.sizes))
            )
            loads = sum(  # (K, G): v = Σ_{i∈S} w_i l_i a_i
                jax.vmap(
                    lambda w, rows=where.index[:, level]: jax.ops.segment_sum(
                        w * load, rows, num_segments=where.total
                    )
                )(membership)
                for level in range(len(where.sizes))
            )
            shared = jnp.einsum("kg,gh,kh->k", loads, step.cov, loads)
        elif config.cohort_level:
            curvature, slope = cohort_sums(terms, cohort, num_cohorts)
            u_mean, u_var = cohort_posterior(theta.tau_cohort, curvature, slope)
            mean = mean + load * u_mean[cohort]
            by_cohort = jax.vmap(
                lambda w: jax.ops.segment_sum(w * load, cohort, num_segments=num_cohorts)
            )(membership)  # (K, G): Σ_{i∈S, g(i)=g} l_i
            shared = by_cohort**2 @ u_var
        else:
            shared = jnp.zeros(membership.shape[0], dtype=mean.dtype)
        return membership @ mean / size, (membership**2 @ variance + shared) / size**2

    return jax.lax.map(one, draws)


def summarize_subgroups(
    draws: Hyper,
    gram: np.ndarray,
    cohort: np.ndarray,
    num_cohorts: int,
    membership: np.ndarray,
    measure: MeasureConfig,
    config: ModelConfig,
    *,
    covariates: np.ndarray | None = None,
    level: float = 0.9,
    groups: np.ndarray | None = None,
    num_groups: tuple[int, ...] = (),
) -> SubgroupSummary:
    """Every subgroup's mean-effect posterior in raw units (module docstring).
    gram (P, d, d), cohort (P,), membership (K, P), covariates (P, q)
    standardised or None; groups (P, L) and num_groups each further grouping
    level's group of every patient and group count, when the config has them."""
    membership = np.asarray(membership, dtype=float)
    # Padded like the population fit's evidence (zero-evidence patients in no
    # subgroup change nothing), so repeated calls reuse one compilation.
    num_patients = int(np.shape(gram)[0])
    p_pad = bucket_size(num_patients, MIN_PATIENT_BUCKET) - num_patients
    g_pad = bucket_size(num_cohorts, MIN_COHORT_BUCKET)

    def padded(array: np.ndarray | None, axis: int = 0) -> jax.Array | None:
        if array is None:
            return None
        widths = [(0, 0)] * np.ndim(array)
        widths[axis] = (0, p_pad)
        return jnp.asarray(np.pad(np.asarray(array), widths))

    means, variances = subgroup_components(
        draws,
        padded(np.asarray(gram, dtype=float)),
        padded(np.asarray(cohort, dtype=np.int32)),
        g_pad,
        padded(membership, axis=1),
        config.structure,
        padded(None if covariates is None else np.asarray(covariates, dtype=float)),
        padded(None if groups is None else np.asarray(groups, dtype=np.int32)),
        tuple(bucket_size(count, MIN_COHORT_BUCKET) for count in num_groups),
    )
    to_raw = float(config.standardization.effect_to_raw(1.0))
    means = np.asarray(means) * to_raw
    sds = np.sqrt(np.maximum(np.asarray(variances), 1e-300)) * to_raw
    alpha = (1.0 - level) / 2.0
    quantiles = np.asarray(
        mixture_quantiles(jnp.asarray(means), jnp.asarray(sds), jnp.asarray([alpha, 1 - alpha]))
    )
    mean = means.mean(axis=0)
    sd = np.sqrt(np.mean(sds**2 + (means - mean) ** 2, axis=0))
    sign = measure.benefit_sign
    p_mcid = np.mean(ndtr((sign * means - measure.mcid) / sds), axis=0)
    p_zero = np.mean(ndtr(sign * means / sds), axis=0)
    return SubgroupSummary(
        mean=mean,
        sd=sd,
        lower=quantiles[0],
        upper=quantiles[1],
        p_benefit_ge_mcid=np.asarray(p_mcid),
        p_benefit_gt_0=np.asarray(p_zero),
        members=membership.sum(axis=1),
    )


#: A subgroup's call, in the words of the programme. A subgroup is judged on
#: clinically meaningful benefit alone: it works when P(mean benefit ≥ MCID) ≥
#: the rule's responder probability, does not work when that probability is ≤
#: its non-responder probability (the mean benefit is confidently below the
#: MCID, harm or none), with the rule's hysteresis (model.config.DecisionRule).
SUBGROUP_CALLS = {
    "responder": "works",
    "non_responder": "does_not_work",
    "uncertain": "uncertain",
    "insufficient_data": "insufficient_data",
}


def subgroup_calls(
    summary: SubgroupSummary,
    rule: DecisionRule,
    *,
    min_members: int = 5,
    previous: list[str | None] | None = None,
) -> list[str]:
    """works / does_not_work / uncertain / insufficient_data (fewer than
    ``min_members`` patients) per subgroup (SUBGROUP_CALLS), with the rule's
    hysteresis against the ``previous`` calls."""
    to_rule = {call: name for name, call in SUBGROUP_CALLS.items()}
    before = None
    if previous is not None:
        before = np.asarray([to_rule.get(call or "", "") for call in previous], dtype=object)
    enough = (summary.members >= min_members).astype(int)
    calls = classify(  # the MCID probability in both places: see SUBGROUP_CALLS
        summary.p_benefit_ge_mcid,
        summary.p_benefit_ge_mcid,
        enough,
        enough,
        rule.model_copy(update={"min_exposed": 1, "min_unexposed": 1}),
        previous=before,
    )
    return [SUBGROUP_CALLS[str(call)] for call in calls]


class SubgroupSpec(BaseModel):
    """A subgroup declared in configuration: the patients in any of ``cohorts``
    (all cohorts when empty) whose covariates satisfy every condition:
    ``ranges`` (numeric covariate → [low, high), either end may be ±inf) and
    ``levels`` (categorical covariate → the levels that belong). ``measures``
    limits it to some measures (empty: every measure)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.=-]+$")
    description: str = ""
    cohorts: tuple[str, ...] = ()
    ranges: dict[str, tuple[float, float]] = Field(default_factory=dict)
    levels: dict[str, tuple[str, ...]] = Field(default_factory=dict)
    measures: tuple[str, ...] = ()

    def check(self, covariates: Sequence[CovariateSpec]) -> None:
        """ValueError when a condition names an unknown covariate or level, or
        a range on a categorical covariate (or levels on a numeric one)."""
        by_name = {spec.name: spec for spec in covariates}
        for name, (low, high) in self.ranges.items():
            spec = by_name.get(name)
            if spec is None or spec.kind != "numeric":
                raise ValueError(f"subgroup {self.name}: {name!r} is not a numeric covariate")
            if not low < high:
                raise ValueError(f"subgroup {self.name}: range of {name!r} must have low < high")
        for name, levels in self.levels.items():
            spec = by_name.get(name)
            if spec is None or spec.kind != "categorical":
                raise ValueError(f"subgroup {self.name}: {name!r} is not a categorical covariate")
            unknown = sorted(set(levels) - set(spec.levels))
            if unknown:
                raise ValueError(f"subgroup {self.name}: {name!r} has no level(s) {unknown}")


def subgroup_membership(
    subgroups: Sequence[SubgroupSpec],
    cohort_labels: Sequence[str],
    design: np.ndarray | None,
    covariates: Sequence[CovariateSpec],
) -> np.ndarray:
    """(K, P) 0/1 membership of every patient in every subgroup, from their
    cohort labels and covariate design rows (natural units, model.covariates)."""
    num_patients = len(cohort_labels)
    design = np.zeros((num_patients, 0)) if design is None else np.asarray(design, dtype=float)
    columns: dict[str, np.ndarray] = {}
    start = 0
    for spec in covariates:
        width = len(spec.columns)
        block = design[:, start : start + width]
        start += width
        if spec.kind == "numeric":
            columns[spec.name] = block[:, 0]
        else:  # the level index: 0 (reference) when no indicator is set
            level = np.where(block.any(axis=1), block.argmax(axis=1) + 1, 0)
            columns[spec.name] = level
    labels = np.asarray(cohort_labels, dtype=object)
    rows = []
    for subgroup in subgroups:
        member = np.ones(num_patients, dtype=bool)
        if subgroup.cohorts:
            member &= np.isin(labels, list(subgroup.cohorts))
        for name, (low, high) in subgroup.ranges.items():
            member &= (columns[name] >= low) & (columns[name] < high)
        by_name = {spec.name: spec for spec in covariates}
        for name, levels in subgroup.levels.items():
            wanted = [by_name[name].levels.index(level) for level in levels]
            member &= np.isin(columns[name], wanted)
        rows.append(member.astype(float))
    return np.stack(rows) if rows else np.zeros((0, num_patients))
