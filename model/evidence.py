"""Per-patient sufficient statistics: the augmented Gram matrices.

For patient i with standardised observations (x_t, t_t, y_t) the augmented
vector is v_t = (w_t, z_t, y_t) with local design w_t = (1, x_t) and population
fixed effects z_t = (t_t, c_t) (the time when the model has a trend, then the
reading's standardised time-varying covariates c_t). The evidence is

    G_i = Σ_t ω_t v_t v_tᵀ,        ω_t = 2^(-(T_i - time_t) / half_life)

where T_i is the patient's reference time (the latest event time seen) and
ω_t ≡ 1 without forgetting. G_i determines the Gaussian likelihood of all of
patient i's observations given its local effects and θ exactly, so nothing else
about the raw stream is kept (besides plain counts for the decision rule).

Statistics are additive: adding events in any order, one at a time or in
batches, or merging two partial statistics of the same patient gives the same
result as the batch computation (up to rounding). Forgetting is order-free too,
because every weight is taken relative to a reference time and re-based when the
reference advances: G(T') = 2^(-(T' - T)/half_life) G(T).

These are numpy functions (a jit dispatch would cost more than the O(d²)
arithmetic of one patient), plus ``add_reading`` in plain Python for the
stream's one-reading-at-a-time step.
"""

from __future__ import annotations

import functools
import math
import struct
from collections.abc import Callable, Sequence
from itertools import chain
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from model.config import ModelConfig

if TYPE_CHECKING:
    from model.events import Events


class PatientStats(NamedTuple):
    """Evidence of P patients for one measure (arrays, leading axis = patient).

    gram: (P, d, d) weighted Σ v vᵀ at each patient's reference time.
    reference_time: (P,) raw time the weights are relative to (−inf: no events).
    count_exposed / count_unexposed: (P,) unweighted numbers of observations
        with exposure ≠ 0 and = 0 (the decision rule's minimum-data check).
    """

    gram: np.ndarray
    reference_time: np.ndarray
    count_exposed: np.ndarray
    count_unexposed: np.ndarray

    @property
    def num_patients(self) -> int:
        return int(self.gram.shape[0])

    @property
    def weighted_count(self) -> np.ndarray:
        """Σ_t ω_t per patient (the (0, 0) entry, since w_0 = 1)."""
        return self.gram[:, 0, 0]


def empty_stats(num_patients: int, config: ModelConfig) -> PatientStats:
    """Statistics of patients with no observations yet (Gram matrices, or cell
    statistics for a Bernoulli or Poisson measure: ModelConfig.stat_shape)."""
    return PatientStats(
        gram=np.zeros((num_patients, *config.stat_shape)),
        reference_time=np.full(num_patients, -np.inf),
        count_exposed=np.zeros(num_patients, dtype=np.int64),
        count_unexposed=np.zeros(num_patients, dtype=np.int64),
    )


def stacked(rows: Sequence[Sequence | bytes], shape: tuple[int, ...]) -> np.ndarray:
    """Patients' statistics (each of ``shape``: a d×d Gram matrix, or a family
    measure's cells) as one (n, *shape) array. A row is nested lists of floats,
    or ``packed`` bytes. Lists are read in one pass over their floats
    (``np.asarray`` walks nested lists an element at a time, at about twice
    the cost); bytes are joined and read as one buffer. Statistics of another
    size raise ValueError (for nested lists: rows of another length, or more
    or fewer floats in all; inner rows of different lengths that add up to
    the expected count are not told apart)."""
    size = math.prod(shape)
    if rows and all(isinstance(row, bytes) for row in rows):
        if any(len(row) != 8 * size for row in rows):
            raise ValueError(f"packed statistics are not {shape} float64 values")
        # joined into a bytearray: one copy, and an array its caller may modify
        return np.frombuffer(bytearray().join(rows), dtype="<f8").reshape(len(rows), *shape)
    if any(isinstance(row, bytes) for row in rows):  # mixed: a row at a time
        return np.stack([stacked([row], shape)[0] for row in rows])
    if any(len(row) != shape[0] for row in rows):
        raise ValueError(f"statistics are not of shape {shape}")
    flat = chain.from_iterable(rows)
    for _ in shape[1:]:
        flat = chain.from_iterable(flat)
    values = np.fromiter(flat, dtype=float, count=len(rows) * size)
    if next(flat, None) is not None:  # more floats than rows of ``shape`` hold
        raise ValueError(f"statistics are not of shape {shape}")
    return values.reshape(len(rows), *shape)


def packed(statistics: np.ndarray) -> bytes:
    """One patient's statistics as bytes: float64, little-endian, row-major
    (what ``stacked`` reads back)."""
    return np.ascontiguousarray(statistics, dtype="<f8").tobytes()


def empty_packed(config: ModelConfig) -> bytes:
    """``packed`` statistics of no readings: zeros of ``config.stat_shape``."""
    return bytes(8 * math.prod(config.stat_shape))


def gram_stats(gram: np.ndarray, reference_time: np.ndarray) -> PatientStats:
    """Statistics from Gram matrices and reference times alone, with zero counts:
    all that fits, drift checks and predictive residuals use."""
    count = np.shape(gram)[0]
    return PatientStats(
        gram=np.asarray(gram, dtype=float),
        reference_time=np.asarray(reference_time, dtype=float),
        count_exposed=np.zeros(count, dtype=np.int64),
        count_unexposed=np.zeros(count, dtype=np.int64),
    )


def augmented_vectors(
    exposure: np.ndarray,
    time: np.ndarray,
    outcome: np.ndarray,
    config: ModelConfig,
    time_covariates: np.ndarray | None = None,
) -> np.ndarray:
    """Rows v = (1, x', [t'], c', y') in standardised units, shape (n, d).
    time_covariates: (n, len(config.time_covariates)) in natural units."""
    y, x, t = config.standardization.apply(outcome, exposure, time)
    columns = [np.ones_like(y), x]
    if config.time_trend:
        columns.append(t)
    columns.extend(_time_covariate_columns(time_covariates, y.shape[0], config))
    columns.append(y)
    return np.stack(columns, axis=-1)


def _time_covariate_columns(
    values: np.ndarray | None, count: int, config: ModelConfig
) -> list[np.ndarray]:
    expected = len(config.time_covariates)
    if values is None:
        if expected:
            raise ValueError(f"the model needs time-varying covariates {config.time_covariates}")
        return []
    values = np.asarray(values, dtype=float).reshape(count, -1)
    if values.shape[1] != expected:
        raise ValueError(f"time_covariates has {values.shape[1]} columns; the model has {expected}")
    values = config.standardization.time_covariates(values)
    return [values[:, k] for k in range(expected)]


def _decay(elapsed: np.ndarray, half_life: float | None) -> np.ndarray:
    """Weight 2^(-elapsed/half_life) of evidence that is `elapsed` time units old."""
    if half_life is None:
        return np.ones_like(elapsed, dtype=float)
    return np.exp2(-elapsed / half_life)


def decay_to(stats: PatientStats, time: np.ndarray | float, config: ModelConfig) -> PatientStats:
    """Re-base every patient's weights to reference time max(T_i, time).

    Used to compare patients at a common "now" (the population update) and when a
    newer event arrives. Without forgetting only the reference time changes.
    """
    new_reference = np.maximum(stats.reference_time, time)
    # A patient without events (reference −inf) has a zero Gram matrix: nothing to decay.
    has_events = np.isfinite(stats.reference_time)
    elapsed = np.where(
        has_events, new_reference - np.where(has_events, stats.reference_time, 0.0), 0.0
    )
    factor = _decay(elapsed, config.half_life)
    return stats._replace(
        # (P, d, d) Gram matrices or (P, CELLS) cell statistics (model.families)
        gram=stats.gram * factor.reshape(-1, *([1] * (stats.gram.ndim - 1))),
        reference_time=new_reference,
    )


def add_events(
    stats: PatientStats,
    patient: np.ndarray,
    exposure: np.ndarray,
    time: np.ndarray,
    outcome: np.ndarray,
    config: ModelConfig,
    time_covariates: np.ndarray | None = None,
) -> PatientStats:
    """Add a batch of observations (raw units) to the statistics. Pure: returns new
    statistics, the input is not modified.

    ``patient`` holds indices into ``stats``. Events may arrive in any order; late
    events are weighted by their own event time. ``time_covariates``: (n, k)
    values of the config's time-varying covariates, natural units.
    """
    patient = np.asarray(patient, dtype=np.int64)
    time = np.asarray(time, dtype=float)
    exposure = np.asarray(exposure, dtype=float)
    num_patients = stats.num_patients
    if patient.size and (patient.min() < 0 or patient.max() >= num_patients):
        raise IndexError(f"patient index out of range 0..{num_patients - 1}")

    latest = np.full(num_patients, -np.inf)
    np.maximum.at(latest, patient, time)
    rebased = decay_to(stats, latest, config)

    vectors = augmented_vectors(exposure, time, outcome, config, time_covariates)
    weights = _decay(rebased.reference_time[patient] - time, config.half_life)
    d = config.stat_dim
    outer = (weights[:, None, None] * vectors[:, :, None] * vectors[:, None, :]).reshape(-1, d * d)
    # Scatter-add by patient: one bincount per Gram entry is far faster than np.add.at.
    increment = np.stack(
        [np.bincount(patient, weights=outer[:, k], minlength=num_patients) for k in range(d * d)],
        axis=-1,
    ).reshape(num_patients, d, d)

    exposed = exposure != 0
    return PatientStats(
        gram=rebased.gram + increment,
        reference_time=rebased.reference_time,
        count_exposed=stats.count_exposed + np.bincount(patient[exposed], minlength=num_patients),
        count_unexposed=stats.count_unexposed
        + np.bincount(patient[~exposed], minlength=num_patients),
    )


def merge_stats(first: PatientStats, second: PatientStats, config: ModelConfig) -> PatientStats:
    """Combine two partial statistics of the same patients (e.g. two partitions'
    deltas): re-base both to the later reference time, then add."""
    reference = np.maximum(first.reference_time, second.reference_time)
    a = decay_to(first, reference, config)
    b = decay_to(second, reference, config)
    return PatientStats(
        gram=a.gram + b.gram,
        reference_time=reference,
        count_exposed=first.count_exposed + second.count_exposed,
        count_unexposed=first.count_unexposed + second.count_unexposed,
    )


def add_reading(
    gram: bytes,
    reference_time: float,
    exposure: float,
    time: float,
    outcome: float,
    config: ModelConfig,
    time_covariates: tuple[float, ...] = (),
) -> tuple[bytes, float]:
    """One patient's statistics plus one observation, in plain Python floats.

    ``gram`` (a d×d Gram matrix as ``packed`` bytes) and ``reference_time`` (−inf:
    no events) are one patient's statistics; returns the new (gram, reference_time),
    packed. The same as ``merge_stats`` of the statistics with ``stats_from_events``
    of the one reading, up to rounding (exactly the same without forgetting). The
    stream applies readings one at a time, where numpy's per-call overhead costs
    ~50× the d² multiply-adds; the statistics stay packed between readings (one
    object of contiguous floats instead of d + 1 lists of d² float objects).
    ``time_covariates``: the reading's time-varying covariates (natural units),
    one per config.time_covariates.
    """
    vectors = reading_vectors([(exposure, time, outcome, time_covariates)], config)
    return add_vectors(gram, reference_time, (time,), vectors, config.half_life)


def reading_vectors(
    readings: Sequence[tuple[float, float, float, tuple[float, ...]]], config: ModelConfig
) -> list[list[float]]:
    """The standardised augmented vector v = (1, exposure, [time], [time
    covariates], outcome) of each of ``readings`` — (exposure, time, outcome,
    time_covariates), raw units — as ``add_reading`` computes it. The same for
    every half-life: the all-time and recent-window statistics share them."""
    std = config.standardization
    locations = std.time_covariate_location
    width = len(config.time_covariates)
    vectors = []
    for exposure, time, outcome, time_covariates in readings:
        vector = [1.0, exposure / std.exposure_scale]
        if config.time_trend:
            vector.append((time - std.time_location) / std.time_scale)
        if len(time_covariates) != width:
            raise ValueError(f"the model needs time-varying covariates {config.time_covariates}")
        if locations:
            time_covariates = tuple(
                (value - location) / scale
                for value, location, scale in zip(
                    time_covariates, locations, std.time_covariate_scale, strict=True
                )
            )
        vector.extend(time_covariates)
        vector.append((outcome - std.outcome_location) / std.outcome_scale)
        vectors.append(vector)
    return vectors


def add_vectors(
    gram: bytes,
    reference_time: float,
    times: Sequence[float],
    vectors: Sequence[Sequence[float]],
    half_life: float | None,
) -> tuple[bytes, float]:
    """One patient's statistics plus readings at ``times`` with augmented
    vectors ``vectors`` (``reading_vectors``), in turn: the same products and
    sums in the same order as ``add_reading`` of each, bit for bit, with the
    matrix unpacked once and packed once instead of once per reading (a
    backlog brings a patient's readings together; the packing and the call
    were most of a reading). Forgetting at ``half_life`` (None: none)."""
    if not vectors:
        return gram, reference_time
    d = len(vectors[0])
    if len(gram) != 8 * d * d:
        raise ValueError(f"statistics of {len(gram)} bytes, not a {d}² Gram matrix")
    if half_life is None:
        return _gram_updates(d, False)(gram, vectors, (), ()), max(reference_time, *times)
    olds, news = [], []
    for time in times:
        reference = max(reference_time, time)
        olds.append(
            2.0 ** (-(reference - reference_time) / half_life)
            if reference_time > -math.inf
            else 1.0
        )
        news.append(2.0 ** (-(reference - time) / half_life))
        reference_time = reference
    return _gram_updates(d, True)(gram, vectors, olds, news), reference_time


@functools.lru_cache(maxsize=16)
def _gram_updates(d: int, decayed: bool) -> Callable[..., bytes]:
    """``updates(gram, vectors, olds, news)``: the packed d×d matrix G plus
    v vᵀ for each vector v in turn, entry by entry G_ij + v_i v_j, or with
    forgetting G_ij·old + v_i v_j·new with the vector's old and new weights,
    as packed bytes. Written out for each of the d² entries (generated
    source, like ``collections.namedtuple``'s), the entries kept in local
    variables between vectors: a loop over the entries built a list of pairs
    and one of sums per reading, ~5× the multiply-adds themselves."""
    layout = struct.Struct(f"<{d * d}d")
    entries = ", ".join(f"g{k}" for k in range(d * d))
    components = "(" + ", ".join(f"v{i}" for i in range(d)) + ",)"
    term = "g{k} * old + v{i} * v{j} * new" if decayed else "g{k} + v{i} * v{j}"
    loop = (
        f"for {components}, old, new in zip(vectors, olds, news)"
        if decayed
        else f"for {components} in vectors"
    )
    body = "".join(
        f"        g{i * d + j} = {term.format(k=i * d + j, i=i, j=j)}\n"
        for i in range(d)
        for j in range(d)
    )
    source = (
        "def updates(gram, vectors, olds, news):\n"
        f"    {entries} = unpack(gram)\n"
        f"    {loop}:\n"
        f"{body}"
        f"    return pack({entries})\n"
    )
    namespace = {"unpack": layout.unpack, "pack": layout.pack}
    exec(source, namespace)  # the source is built above from integers only
    return namespace["updates"]


def stats_from_events(
    num_patients: int,
    patient: np.ndarray,
    exposure: np.ndarray,
    time: np.ndarray,
    outcome: np.ndarray,
    config: ModelConfig,
    time_covariates: np.ndarray | None = None,
) -> PatientStats:
    """Batch computation of every patient's statistics from all its events."""
    return add_events(
        empty_stats(num_patients, config), patient, exposure, time, outcome, config, time_covariates
    )


def events_stats(events: Events, config: ModelConfig) -> PatientStats:
    """``stats_from_events`` of a programme's observations (model.events.Events),
    time-varying covariates included."""
    return stats_from_events(
        events.num_patients,
        events.patient,
        events.exposure,
        events.time,
        events.outcome,
        config,
        time_covariates=events.time_covariates,
    )
