"""A programme's observations as flat arrays: the shared input of the offline
fit, the references and the simulator."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Events:
    """One row per observation, raw units.

    patient: (n,) patient index in [0, P); cohort_of_patient: (P,) cohort index
    in [0, G) of each patient; time, exposure, outcome: (n,) floats. Exposure
    may be a dose: a fraction of the full exposure.
    covariates: (P, q) patient covariates (constant per patient; categorical
    ones as 0/1 indicator columns), natural units; time_covariates: (n, k)
    time-varying covariates of each observation. None: none. Their column
    names: covariate_names, time_covariate_names (empty: x1, x2, … / c1, c2, …).
    groups: (P, L) group index ≥ 0 of each patient at each further grouping level
    (crossed with or nested in the cohorts: a genotype cluster, a stratum),
    named by group_names (empty: level1, level2, …). None: the cohorts only.
    offset: (n,) exposure of each reading of a count outcome (person-time, the
    Poisson rate's multiplier), None: 1 each (model.families).
    """

    patient: np.ndarray
    cohort_of_patient: np.ndarray
    time: np.ndarray
    exposure: np.ndarray
    outcome: np.ndarray
    covariates: np.ndarray | None = None
    time_covariates: np.ndarray | None = None
    covariate_names: tuple[str, ...] = ()
    time_covariate_names: tuple[str, ...] = ()
    groups: np.ndarray | None = None
    group_names: tuple[str, ...] = ()
    offset: np.ndarray | None = None

    def __post_init__(self) -> None:
        n = np.shape(self.patient)[0] if np.ndim(self.patient) == 1 else -1
        for name in ("patient", "time", "exposure", "outcome"):
            value = np.asarray(getattr(self, name))
            if value.ndim != 1 or value.shape[0] != n:
                raise ValueError(f"Events.{name} must be a 1-d array of length {n}")
            if name != "patient" and not np.all(np.isfinite(value)):
                raise ValueError(f"Events.{name} has non-finite values")
        cohort = np.asarray(self.cohort_of_patient)
        if cohort.ndim != 1 or (cohort.size and cohort.min() < 0):
            raise ValueError("Events.cohort_of_patient must be a 1-d array of indices >= 0")
        if n and (np.min(self.patient) < 0 or np.max(self.patient) >= cohort.size):
            raise ValueError(f"Events.patient indices must lie in [0, {cohort.size})")
        for name, rows in (("covariates", cohort.size), ("time_covariates", n)):
            value = getattr(self, name)
            if value is None:
                continue
            value = np.asarray(value, dtype=float)
            if value.ndim != 2 or value.shape[0] != rows:
                raise ValueError(f"Events.{name} must have shape ({rows}, k)")
            if not np.all(np.isfinite(value)):
                raise ValueError(f"Events.{name} has non-finite values")
        if self.offset is not None:
            offset = np.asarray(self.offset, dtype=float)
            if offset.shape != (n,) or not np.all(np.isfinite(offset) & (offset > 0)):
                raise ValueError(f"Events.offset must be {n} positive finite exposures")
        if self.groups is not None:
            groups = np.asarray(self.groups)
            if (
                groups.ndim != 2
                or groups.shape[0] != cohort.size
                or (groups.size and groups.min() < 0)
            ):
                raise ValueError(f"Events.groups must be indices >= 0 of shape ({cohort.size}, L)")
            if self.group_names and len(self.group_names) != groups.shape[1]:
                raise ValueError(
                    f"{len(self.group_names)} group_names for {groups.shape[1]} levels"
                )

    @property
    def num_patients(self) -> int:
        return int(np.asarray(self.cohort_of_patient).size)

    @property
    def grouping_levels(self) -> tuple[str, ...]:
        """Names of the further grouping levels (empty without)."""
        if self.groups is None:
            return ()
        count = np.shape(self.groups)[1]
        return tuple(self.group_names) or tuple(f"level{k + 1}" for k in range(count))

    @property
    def num_groups(self) -> tuple[int, ...]:
        """Group count of every further grouping level."""
        if self.groups is None:
            return ()
        groups = np.asarray(self.groups)
        return tuple(
            int(n) for n in (groups.max(axis=0) + 1 if groups.size else [0] * groups.shape[1])
        )

    @property
    def num_cohorts(self) -> int:
        cohort = np.asarray(self.cohort_of_patient)
        return int(cohort.max()) + 1 if cohort.size else 0

    def subset(self, rows: np.ndarray) -> Events:
        """The same patients with only the selected observations."""
        return Events(
            self.patient[rows],
            self.cohort_of_patient,
            self.time[rows],
            self.exposure[rows],
            self.outcome[rows],
            self.covariates,
            None if self.time_covariates is None else self.time_covariates[rows],
            self.covariate_names,
            self.time_covariate_names,
            self.groups,
            self.group_names,
            None if self.offset is None else self.offset[rows],
        )
