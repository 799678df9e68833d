"""The cubic O'Sullivan spline basis of a smooth covariate (model.smooth explains
the model): its knots, its penalised columns and its roughness penalty. Kept
apart from model.smooth (numpyro, jax) so that model.config can name a model's
spline bases (ModelConfig.splines) with numpy, scipy and pydantic only."""

from __future__ import annotations

import functools
import itertools
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator
from scipy import special
from scipy.interpolate import BSpline

if TYPE_CHECKING:
    from model.config import ModelConfig

SPLINE_COLUMN = re.compile(r"^(?P<covariate>.+):s(?P<index>[0-9]+)$")
DEFAULT_KNOTS = 4


class SplineBasis(BaseModel):
    """The spline of one covariate, standardised units: interior ``knots`` and the
    ``boundary`` (low, high) of the cubic B-spline basis; K knots give K + 2
    penalised columns (module docstring)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    covariate: str = Field(min_length=1)
    knots: tuple[float, ...] = Field(min_length=1)
    boundary: tuple[float, float]

    @model_validator(mode="after")
    def _ordered(self) -> SplineBasis:
        points = (self.boundary[0], *self.knots, self.boundary[1])
        if not all(a < b for a, b in itertools.pairwise(points)):
            raise ValueError(
                f"{self.covariate}: knots must increase strictly inside the boundary, got "
                f"knots {self.knots} in {self.boundary}"
            )
        return self

    @classmethod
    def from_values(cls, covariate: str, values: np.ndarray, num_knots: int = DEFAULT_KNOTS):
        """Interior knots at the quantiles k/(K+1) of the (standardised) values, the
        boundary at their range."""
        values = np.asarray(values, dtype=float)
        distinct = np.unique(values)
        if distinct.size < num_knots + 2:
            raise ValueError(
                f"covariate {covariate!r} has {distinct.size} distinct values: too few for a "
                f"spline with {num_knots} knots (a smooth covariate needs at least {num_knots + 2})"
            )
        knots = np.quantile(values, np.arange(1, num_knots + 1) / (num_knots + 1))
        return cls(
            covariate=covariate,
            knots=tuple(float(k) for k in np.unique(knots)),
            boundary=(float(distinct[0]), float(distinct[-1])),
        )

    @classmethod
    def from_spread(
        cls, covariate: str, boundary: tuple[float, float], num_knots: int = DEFAULT_KNOTS
    ) -> SplineBasis:
        """The basis of a covariate known by its typical value and spread (the
        stream's catalogue) rather than by data: standardised units, so the
        values are about N(0, 1); interior knots at the quantiles k/(K+1) of
        N(0, 1) truncated to ``boundary`` (the quartiles and quintiles of the
        values, as from_values takes them from data)."""
        low, high = boundary
        if not low < high:
            raise ValueError(
                f"{covariate}: the spline boundary must have low < high, got {boundary}"
            )
        edges = special.ndtr(np.array([low, high]))
        levels = edges[0] + (edges[1] - edges[0]) * np.arange(1, num_knots + 1) / (num_knots + 1)
        knots = special.ndtri(levels)
        return cls(covariate=covariate, knots=tuple(float(k) for k in knots), boundary=(low, high))

    @property
    def columns(self) -> tuple[str, ...]:
        """Names of the penalised columns: ``<covariate>:s1`` … ``:s{K+2}``."""
        return tuple(f"{self.covariate}:s{j + 1}" for j in range(len(self.knots) + 2))

    def design(self, values: np.ndarray) -> np.ndarray:
        """Z(v') of standardised values (n,): (n, K + 2)."""
        return _osullivan(self.knots, self.boundary, np.asarray(values, dtype=float))


def _knot_vector(knots: Sequence[float], boundary: tuple[float, float]) -> np.ndarray:
    low, high = boundary
    return np.concatenate([[low] * 4, list(knots), [high] * 4])


def _osullivan(knots: Sequence[float], boundary: tuple[float, float], values: np.ndarray):
    vector = _knot_vector(knots, boundary)
    basis = BSpline.design_matrix(np.clip(values, *boundary), vector, 3).toarray()
    return basis @ _penalised_directions(tuple(knots), tuple(boundary))


@functools.lru_cache(maxsize=64)
def _penalised_directions(knots: tuple[float, ...], boundary: tuple[float, float]) -> np.ndarray:
    """U₊ diag(d₊)^(-1/2) of the roughness penalty (module docstring of
    model.smooth), once per basis: the stream expands one patient's row at a time."""
    count = len(knots) + 4
    eigenvalues, eigenvectors = np.linalg.eigh(roughness_penalty(knots, boundary))
    order = np.argsort(eigenvalues)[::-1][: count - 2]
    transform = eigenvectors[:, order] / np.sqrt(eigenvalues[order])
    transform.setflags(write=False)
    return transform


def roughness_penalty(knots: Sequence[float], boundary: tuple[float, float]) -> np.ndarray:
    """Ω_kl = ∫ B_k''(v) B_l''(v) dv over the boundary, exactly: B'' is linear
    between knots, so Simpson's rule on every interval is exact."""
    vector = _knot_vector(knots, boundary)
    count = len(knots) + 4
    points = np.unique(vector)
    left, right = points[:-1], points[1:]
    nodes = np.concatenate([left, (left + right) / 2.0, right])
    second = np.stack(
        [BSpline(vector, np.eye(count)[k], 3).derivative(2)(nodes) for k in range(count)], axis=-1
    )
    m = left.size
    a, mid, b = second[:m], second[m : 2 * m], second[2 * m :]
    width = (right - left)[:, None, None]
    outer = (
        a[:, :, None] * a[:, None, :]
        + 4.0 * mid[:, :, None] * mid[:, None, :]
        + b[:, :, None] * b[:, None, :]
    )
    return np.sum(width * outer / 6.0, axis=0)


def with_spline_columns(rows: np.ndarray, config: ModelConfig) -> np.ndarray:
    """Patients' rows (P, q₀) of the covariates' own columns, natural units (a
    catalogue design row: model.covariates.encode_patient) with the penalised
    columns of ``config.splines`` appended: (P, q), ``config.covariates``' order.
    Each basis is evaluated at its covariate standardised by the linear
    column's location and scale, as model.smooth.add_smooth_terms builds them."""
    rows = np.asarray(rows, dtype=float)
    std = config.standardization
    names = list(config.covariates)
    blocks = [rows]
    for basis in config.splines:
        linear = names.index(basis.covariate)
        location = std.covariate_location[linear] if std.covariate_location else 0.0
        scale = std.covariate_scale[linear] if std.covariate_scale else 1.0
        blocks.append(basis.design((rows[:, linear] - location) / scale))
    return np.concatenate(blocks, axis=-1)


def own_columns(config: ModelConfig) -> int:
    """How many of ``config.covariates`` are not spline columns of its splines."""
    return config.num_covariates - sum(len(basis.columns) for basis in config.splines)
