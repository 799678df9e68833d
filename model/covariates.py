"""Patient covariates: how a baseline characteristic becomes columns of the
design x_i that shifts a patient's expected intercept and effect (model.likelihood).

A covariate is numeric (age, BMI, baseline HbA1c: one column, in its unit) or
categorical (sex, genotype cluster: one 0/1 indicator column per level after
the first, the reference). The columns are then standardised by
model.config.Standardization (centred and scaled), so a coefficient's prior
means the same for every covariate and μ is the effect of a patient at the
covariates' centre.

The same specification serves the stream (the covariate catalogue next to the
measure catalogue, enrolment events carrying the values) and ``efficacy fit``
(specifications inferred from a CSV's columns).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from model.config import ModelConfig
from model.splines import DEFAULT_KNOTS, SplineBasis, own_columns, with_spline_columns

#: A stream's smooth covariate bends within this many scales of its typical value
#: (CovariateSpec.spline): 99.7% of a normal spread, where patients are.
SPLINE_SPREAD = 3.0


class CovariateError(ValueError):
    """A covariate value the specification does not accept; the message names it."""


class CovariateSpec(BaseModel):
    """One patient covariate: its kind, unit, plausible range or levels, and
    where a numeric one is centred and how it is scaled (its standardisation)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1)
    kind: Literal["numeric", "categorical"] = "numeric"
    unit: str = ""
    description: str = ""
    plausible_range: tuple[float, float] = (-math.inf, math.inf)
    levels: tuple[str, ...] = Field(
        default=(), description="categorical: the levels; the first is the reference"
    )
    location: float = Field(default=0.0, description="numeric: where it is centred")
    scale: float = Field(default=1.0, gt=0.0, description="numeric: its unit of variation")
    required: bool = Field(
        default=True, description="a patient without a value is rejected (else: the centre)"
    )
    varies: Literal["patient", "reading"] = Field(
        default="patient",
        description="patient: a baseline characteristic, in the mean of the patient's effect; "
        "reading: a time-varying covariate each reading carries, a population fixed effect",
    )

    @model_validator(mode="after")
    def _consistent(self) -> CovariateSpec:
        low, high = self.plausible_range
        if not low < high:
            raise ValueError(f"{self.name}: plausible_range must have low < high")
        if self.kind == "categorical" and len(self.levels) < 2:
            raise ValueError(f"{self.name}: a categorical covariate needs at least two levels")
        if self.kind == "categorical" and len(set(self.levels)) != len(self.levels):
            raise ValueError(f"{self.name}: repeated levels")
        if self.kind == "numeric" and self.levels:
            raise ValueError(f"{self.name}: a numeric covariate has no levels")
        if self.varies == "reading" and self.kind != "numeric":
            raise ValueError(f"{self.name}: a covariate that varies by reading must be numeric")
        return self

    @property
    def columns(self) -> tuple[str, ...]:
        """Names of its design columns: the name, or ``name=level`` per non-reference level."""
        if self.kind == "numeric":
            return (self.name,)
        return tuple(f"{self.name}={level}" for level in self.levels[1:])

    @property
    def column_location(self) -> tuple[float, ...]:
        return (self.location,) if self.kind == "numeric" else (0.0,) * (len(self.levels) - 1)

    @property
    def column_scale(self) -> tuple[float, ...]:
        return (self.scale,) if self.kind == "numeric" else (1.0,) * (len(self.levels) - 1)

    def encode(self, value: Any) -> list[float]:
        """One patient's value as its design columns (natural units).

        Raises CovariateError for a missing required value, a non-numeric or
        out-of-range number, or an unknown level. A missing optional value is
        the centre: the location, or the reference level.
        """
        if value is None or (isinstance(value, str) and not value.strip()):
            if self.required:
                raise CovariateError(f"covariate {self.name!r} is required and missing")
            return list(self.column_location) if self.kind == "numeric" else self._indicators(0)
        if self.kind == "categorical":
            label = str(value).strip()
            if label not in self.levels:
                raise CovariateError(
                    f"covariate {self.name!r}: unknown level {label!r} "
                    f"(levels: {', '.join(self.levels)})"
                )
            return self._indicators(self.levels.index(label))
        if isinstance(value, bool):
            raise CovariateError(f"covariate {self.name!r} must be a number, got {value!r}")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise CovariateError(
                f"covariate {self.name!r} must be a number, got {value!r}"
            ) from None
        low, high = self.plausible_range
        if not (math.isfinite(number) and low <= number <= high):
            raise CovariateError(
                f"covariate {self.name!r} = {number:g} is outside its plausible range "
                f"[{low:g}, {high:g}] {self.unit}".rstrip()
            )
        return [number]

    def spline(self, num_knots: int = DEFAULT_KNOTS) -> SplineBasis:
        """The spline basis of this numeric covariate as a smooth covariate of
        the stream, from its specification alone (the catalogue fixes the
        standardisation forever, so the knots cannot follow the data): the
        boundary is the plausible range cut to SPLINE_SPREAD scales either
        side of the location, the knots at quantiles of N(0, 1) truncated to it
        (SplineBasis.from_spread). Beyond the boundary the curve continues with
        its linear slope. ValueError for a categorical covariate, or when the
        plausible range lies outside that span."""
        if self.kind != "numeric" or self.varies != "patient":
            raise ValueError(f"{self.name}: a smooth covariate is a numeric patient covariate")
        low, high = self.plausible_range
        low = max(low, self.location - SPLINE_SPREAD * self.scale)
        high = min(high, self.location + SPLINE_SPREAD * self.scale)
        if not low < high:
            raise ValueError(
                f"{self.name}: the plausible range {list(self.plausible_range)} lies outside "
                f"{SPLINE_SPREAD:g} scales of the typical value {self.location:g}: no spline"
            )
        boundary = ((low - self.location) / self.scale, (high - self.location) / self.scale)
        return SplineBasis.from_spread(self.name, boundary, num_knots)

    def _indicators(self, level: int) -> list[float]:
        return [1.0 if level == k else 0.0 for k in range(1, len(self.levels))]

    @classmethod
    def infer(cls, name: str, values: Sequence[str]) -> CovariateSpec:
        """A specification from a column of text values (``efficacy fit``):
        numeric when every value parses as a finite number (centred at the
        mean, scaled by the sd), else categorical with its levels sorted (the
        first is the reference)."""
        try:
            numbers = np.array([float(value) for value in values])
        except ValueError:
            numbers = None
        if numbers is not None and numbers.size and np.all(np.isfinite(numbers)):
            sd = float(numbers.std())
            return cls(name=name, location=float(numbers.mean()), scale=sd if sd > 0 else 1.0)
        levels = tuple(sorted({str(value).strip() for value in values}))
        if len(levels) < 2:
            raise CovariateError(f"covariate {name!r} has a single level {levels}: nothing to fit")
        return cls(name=name, kind="categorical", levels=levels)


def design_columns(specs: Sequence[CovariateSpec]) -> tuple[str, ...]:
    """Names of all design columns, in order (ModelConfig.covariates)."""
    return tuple(column for spec in specs for column in spec.columns)


def column_blocks(columns: Sequence[str]) -> dict[str, tuple[int, ...]]:
    """Design column names (``age``, ``sex=male``, …) grouped by covariate: name
    → the indices of its columns (model.selection compares blocks). A smooth
    covariate's spline columns (``age:s1``, …, model.smooth) are a block of their
    own, ``age:smooth``, next to its linear column ``age``: the selection then
    compares the straight line with the curve."""
    from model.smooth import SPLINE_COLUMN

    blocks: dict[str, list[int]] = {}
    for index, column in enumerate(columns):
        spline = SPLINE_COLUMN.match(column)
        name = f"{spline['covariate']}:smooth" if spline else column.split("=", 1)[0]
        blocks.setdefault(name, []).append(index)
    return {name: tuple(indices) for name, indices in blocks.items()}


def encode_patient(specs: Sequence[CovariateSpec], values: Mapping[str, Any]) -> list[float]:
    """One patient's design row (natural units) from its covariate values by
    name; raises CovariateError naming the first bad value. Names the
    specifications do not know are rejected too: a typo must not pass as a
    missing optional value."""
    if not specs and not values:  # the common case, on every reading
        return []
    known = {spec.name for spec in specs}
    unknown = sorted(set(values) - known)
    if unknown:
        raise CovariateError(
            f"unknown covariate(s) {', '.join(map(repr, unknown))}; "
            f"the catalogue has {', '.join(sorted(known)) or 'none'}"
        )
    return [column for spec in specs for column in spec.encode(values.get(spec.name))]


def patient_design(rows: Sequence[Sequence[float]], config: ModelConfig) -> np.ndarray | None:
    """Patients' design rows (natural units) as a (P, q) array for ``config``'s
    covariates; None when it has none. See _rows_or_centre. With smooth
    covariates (ModelConfig.splines) a row of the covariates' own columns (what
    an enrolment carries) gets the spline columns appended
    (model.splines.with_spline_columns); a row that has them already is kept."""
    if config.splines:
        own = own_columns(config)
        rows = list(rows)
        short = [k for k, row in enumerate(rows) if len(row) == own]
        if short:
            full = with_spline_columns(np.asarray([rows[k] for k in short], dtype=float), config)
            for k, row in zip(short, full, strict=True):
                rows[k] = row
    return _rows_or_centre(rows, config.standardization.covariate_location, config.num_covariates)


def reading_design(rows: Sequence[Sequence[float]], config: ModelConfig) -> np.ndarray | None:
    """Readings' time-varying covariates (natural units) as an (n, k) array for
    ``config``'s time_covariates; None when it has none. See _rows_or_centre."""
    return _rows_or_centre(
        rows, config.standardization.time_covariate_location, len(config.time_covariates)
    )


def _rows_or_centre(
    rows: Sequence[Sequence[float]], location: Sequence[float], width: int
) -> np.ndarray | None:
    """A row of another length (recorded without the covariates, or under
    another catalogue) is taken at their centre: ``location``, zeros if unset."""
    if not width:
        return None
    centre = list(location) if location else [0.0] * width
    return np.asarray(
        [list(row) if len(row) == width else centre for row in rows], dtype=float
    ).reshape(len(rows), width)


def design_standardization(specs: Sequence[CovariateSpec]) -> tuple[tuple, tuple]:
    """(location, scale) of every design column, for Standardization's
    covariate_location / covariate_scale: numeric columns by their spec,
    indicator columns as they are (0, 1)."""
    location = tuple(value for spec in specs for value in spec.column_location)
    scale = tuple(value for spec in specs for value in spec.column_scale)
    return location, scale
