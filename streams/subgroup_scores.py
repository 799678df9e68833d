"""The population agent's subgroup step (pure): after a population posterior,
every declared subgroup's efficacy (model.subgroups) as SubgroupScore messages,
published when they change materially, and an alert when a call changes.

    state, outputs = subgroup_step(state, posterior, snapshot, context)

``state`` is the last published SubgroupScore per subgroup of one measure; it
lives in the agent's memory, so after a restart every subgroup is published
again once (the topic is compacted: consumers see the same latest value).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime

import numpy as np

from model.config import DecisionRule, ModelConfig
from model.subgroups import subgroup_calls, subgroup_membership, summarize_subgroups
from streams.catalogue import Catalogue
from streams.population_book import GroupLabels
from streams.schemas import Alert, PopulationPosterior, SubgroupScore
from streams.scoring import LEVEL, MeasurePosterior, interval_at, standardized_covariates

#: Published again when the call changes, the mean moves by this many posterior
#: sds, or P(mean benefit ≥ MCID) by this much (as a patient's score).
MATERIAL_SHIFT_SD = 0.1
MATERIAL_PROBABILITY = 0.02
MIN_MEMBERS = 5  # fewer patients: insufficient_data


@dataclass(frozen=True)
class BookSnapshot:
    """What the population agent fitted: statistics, cohorts, covariate rows."""

    gram: np.ndarray  # (P, d, d) standardised, at the common reference time
    cohort: np.ndarray  # (P,) index into cohorts
    cohorts: list[str]
    covariates: np.ndarray | None  # (P, q) design rows, natural units
    groups: GroupLabels | None = None  # the further grouping levels' groups


@dataclass
class SubgroupOutputs:
    scores: list[SubgroupScore] = field(default_factory=list)
    alerts: list[Alert] = field(default_factory=list)


def changed_materially(previous: SubgroupScore | None, score: SubgroupScore) -> bool:
    if previous is None:
        return True
    sd = max(score.effect.sd, 1e-12)
    return (
        previous.call != score.call
        or abs(score.effect.mean - previous.effect.mean) >= MATERIAL_SHIFT_SD * sd
        or abs(score.p_benefit_ge_mcid - previous.p_benefit_ge_mcid) >= MATERIAL_PROBABILITY
    )


def subgroup_step(
    state: dict[str, SubgroupScore],
    posterior: PopulationPosterior,
    snapshot: BookSnapshot,
    catalogue: Catalogue,
    model: ModelConfig,
    rule: DecisionRule,
) -> tuple[dict[str, SubgroupScore], SubgroupOutputs]:
    """Score the measure's subgroups under ``posterior`` on the evidence it was
    fitted on; returns the new state and what to send. Blocking (one jitted
    call over the draws): run it off the event loop."""
    measure = posterior.measure
    specs = catalogue.subgroups_of(measure)
    outputs = SubgroupOutputs()
    if not specs or snapshot.gram.shape[0] == 0:
        return state, outputs
    labels = [snapshot.cohorts[g] for g in snapshot.cohort]
    membership = subgroup_membership(
        specs, labels, snapshot.covariates, catalogue.patient_covariates
    )
    members = membership.sum(axis=1)
    scored = [k for k in range(len(specs)) if members[k] >= 1]
    if not scored:
        return state, outputs
    spec = catalogue.get(measure)
    covariates = None
    if model.num_covariates:
        covariates = standardized_covariates(list(snapshot.covariates), model)
    summary = summarize_subgroups(
        MeasurePosterior.from_message(posterior).draws,
        snapshot.gram,
        snapshot.cohort,
        max(len(snapshot.cohorts), 1),
        membership[scored],
        spec.measure_config(),
        model,
        covariates=covariates,
        level=LEVEL,
        groups=None if snapshot.groups is None else snapshot.groups.index,
        num_groups=(
            () if snapshot.groups is None else tuple(max(len(g), 1) for g in snapshot.groups.labels)
        ),
    )
    previous = [state.get(specs[k].name) for k in scored]
    calls = subgroup_calls(
        summary,
        rule,
        min_members=MIN_MEMBERS,
        previous=[p.call if p is not None else None for p in previous],
    )
    state = dict(state)
    now = datetime.now(UTC)
    for j, k in enumerate(scored):
        subgroup = specs[k]
        score = SubgroupScore(
            event_id=f"subgroup:{measure}:{subgroup.name}:{posterior.version}",
            event_time=now,
            measure=measure,
            subgroup=subgroup.name,
            description=subgroup.description,
            members=int(summary.members[j]),
            unit=spec.unit,
            mcid=spec.mcid,
            effect=interval_at(summary, j),
            level=LEVEL,
            p_benefit_ge_mcid=float(summary.p_benefit_ge_mcid[j]),
            p_benefit_gt_0=float(summary.p_benefit_gt_0[j]),
            call=calls[j],
            population_version=posterior.version,
        )
        before = previous[j]
        if not changed_materially(before, score):
            continue
        state[subgroup.name] = score
        outputs.scores.append(score)
        if before is not None and before.call != score.call:
            outputs.alerts.append(
                Alert(
                    event_id=f"subgroup-call:{measure}:{subgroup.name}:{posterior.version}",
                    event_time=now,
                    kind="subgroup_call",
                    severity="warning",
                    measure=measure,
                    subgroup=subgroup.name,
                    message=f"{measure}, subgroup {subgroup.name}: {before.call} -> {score.call}",
                    previous=before.call,
                    current=score.call,
                    population_version=posterior.version,
                    statistics={
                        "p_benefit_ge_mcid": score.p_benefit_ge_mcid,
                        "members": float(score.members),
                    },
                )
            )
    return state, outputs
