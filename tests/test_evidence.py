"""Incremental sufficient statistics equal the batch computation after every update."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from model.config import ModelConfig, Standardization
from model.evidence import (
    add_events,
    add_reading,
    augmented_vectors,
    decay_to,
    empty_stats,
    merge_stats,
    packed,
    stacked,
    stats_from_events,
)

CONFIGS = {
    "plain": ModelConfig(),
    "forgetting": ModelConfig(half_life=7.0),
    "no-trend": ModelConfig(time_trend=False, half_life=3.0),
}


@st.composite
def event_batches(draw):
    num_patients = draw(st.integers(1, 5))
    n = draw(st.integers(1, 25))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    patient = rng.integers(0, num_patients, n)
    exposure = rng.integers(0, 2, n).astype(float)
    time = rng.uniform(0.0, 30.0, n)
    outcome = rng.normal(70.0, 5.0, n)
    return num_patients, patient, exposure, time, outcome


def dense_reference(num_patients, patient, exposure, time, outcome, config):
    """Batch statistics written from the definition, one patient at a time."""
    d = config.stat_dim
    gram = np.zeros((num_patients, d, d))
    for i in range(num_patients):
        rows = patient == i
        if not rows.any():
            continue
        v = augmented_vectors(exposure[rows], time[rows], outcome[rows], config)
        reference = time[rows].max()
        weights = (
            np.ones(rows.sum())
            if config.half_life is None
            else 0.5 ** ((reference - time[rows]) / config.half_life)
        )
        gram[i] = (weights[:, None] * v).T @ v
    return gram


@pytest.mark.parametrize("name", sorted(CONFIGS))
@settings(max_examples=40, deadline=None)
@given(batch=event_batches(), order_seed=st.integers(0, 1000))
def test_one_event_at_a_time_matches_batch_after_every_update(name, batch, order_seed):
    config = CONFIGS[name]
    num_patients, patient, exposure, time, outcome = batch
    order = np.random.default_rng(order_seed).permutation(len(patient))
    stats = empty_stats(num_patients, config)
    for step, k in enumerate(order, start=1):
        stats = add_events(
            stats,
            patient[k : k + 1],
            exposure[k : k + 1],
            time[k : k + 1],
            outcome[k : k + 1],
            config,
        )
        seen = order[:step]
        expected = dense_reference(
            num_patients, patient[seen], exposure[seen], time[seen], outcome[seen], config
        )
        # Compare at each patient's own reference time (its latest event so far).
        np.testing.assert_allclose(stats.gram, expected, rtol=1e-10, atol=1e-10)
    assert stats.count_exposed.sum() + stats.count_unexposed.sum() == len(patient)
    np.testing.assert_array_equal(
        stats.count_exposed, np.bincount(patient[exposure != 0], minlength=num_patients)
    )


@pytest.mark.parametrize("name", sorted(CONFIGS))
@settings(max_examples=40, deadline=None)
@given(batch=event_batches(), order_seed=st.integers(0, 1000))
def test_add_reading_in_plain_python_matches_batch_after_every_update(name, batch, order_seed):
    """The stream's per-reading step (packed floats, no numpy) against the definition."""
    config = CONFIGS[name]
    num_patients, patient, exposure, time, outcome = batch
    order = np.random.default_rng(order_seed).permutation(len(patient))
    empty = empty_stats(1, config)
    grams = [packed(empty.gram[0]) for _ in range(num_patients)]
    references = [float("-inf")] * num_patients
    for step, k in enumerate(order, start=1):
        i = int(patient[k])
        grams[i], references[i] = add_reading(
            grams[i], references[i], float(exposure[k]), float(time[k]), float(outcome[k]), config
        )
        seen = order[:step]
        expected = dense_reference(
            num_patients, patient[seen], exposure[seen], time[seen], outcome[seen], config
        )
        d = config.stat_dim
        got = np.frombuffer(b"".join(grams), dtype="<f8").reshape(num_patients, d, d)
        np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-10)
    batch_stats = stats_from_events(num_patients, patient, exposure, time, outcome, config)
    np.testing.assert_array_equal(np.array(references), batch_stats.reference_time)


@pytest.mark.parametrize("name", sorted(CONFIGS))
@settings(max_examples=40, deadline=None)
@given(batch=event_batches(), split=st.floats(0.0, 1.0))
def test_merging_partial_statistics_matches_batch(name, batch, split):
    config = CONFIGS[name]
    num_patients, patient, exposure, time, outcome = batch
    cut = int(split * len(patient))
    first = stats_from_events(
        num_patients, patient[:cut], exposure[:cut], time[:cut], outcome[:cut], config
    )
    second = stats_from_events(
        num_patients, patient[cut:], exposure[cut:], time[cut:], outcome[cut:], config
    )
    merged = merge_stats(first, second, config)
    whole = stats_from_events(num_patients, patient, exposure, time, outcome, config)
    np.testing.assert_allclose(merged.gram, whole.gram, rtol=1e-10, atol=1e-10)
    np.testing.assert_array_equal(merged.reference_time, whole.reference_time)


def test_decay_halves_evidence_after_one_half_life():
    config = ModelConfig(half_life=10.0)
    stats = stats_from_events(
        1, np.array([0]), np.array([1.0]), np.array([5.0]), np.array([2.0]), config
    )
    later = decay_to(stats, 15.0, config)
    np.testing.assert_allclose(later.gram, 0.5 * stats.gram)
    assert later.reference_time[0] == 15.0


def test_statistics_are_in_standardised_units():
    config = ModelConfig(
        standardization=Standardization(
            outcome_location=100.0, outcome_scale=10.0, exposure_scale=2.0
        )
    )
    stats = stats_from_events(
        1, np.array([0]), np.array([2.0]), np.array([0.0]), np.array([120.0]), config
    )
    # v = (1, x/2, t, (y-100)/10) = (1, 1, 0, 2)
    v = np.array([1.0, 1.0, 0.0, 2.0])
    np.testing.assert_allclose(stats.gram[0], np.outer(v, v))


def test_inputs_are_not_mutated_and_bad_index_is_rejected():
    config = ModelConfig()
    stats = empty_stats(2, config)
    before = stats.gram.copy()
    add_events(stats, np.array([1]), np.array([1.0]), np.array([0.0]), np.array([1.0]), config)
    np.testing.assert_array_equal(stats.gram, before)
    with pytest.raises(IndexError, match="patient index"):
        add_events(stats, np.array([2]), np.array([1.0]), np.array([0.0]), np.array([1.0]), config)


def test_stacked_statistics_equal_numpy_s_conversion_and_refuse_a_wrong_size() -> None:
    rng = np.random.default_rng(0)
    grams = rng.normal(size=(7, 4, 4))
    cells = rng.normal(size=(5, 5))
    assert np.array_equal(stacked(grams.tolist(), (4, 4)), grams)
    assert np.array_equal(stacked(cells.tolist(), (5,)), cells)
    assert stacked([], (4, 4)).shape == (0, 4, 4)
    short = grams.tolist()
    short[3] = short[3][:3]  # a 3×4 "Gram matrix"
    with pytest.raises(ValueError):
        stacked(short, (4, 4))
    with pytest.raises(ValueError):  # a model with fewer columns than the statistics
        stacked(grams.tolist(), (3, 3))
    with pytest.raises(ValueError):
        stacked(grams[:, :3, :3].tolist(), (4, 4))
    # packed rows (PatientEvidence as the worker writes it), alone or mixed with lists
    rows = [packed(g) for g in grams]
    assert np.array_equal(stacked(rows, (4, 4)), grams)
    mixed = [rows[0], grams[1].tolist(), *rows[2:]]
    assert np.array_equal(stacked(mixed, (4, 4)), grams)
    with pytest.raises(ValueError):
        stacked([*rows[:-1], rows[-1][:-8]], (4, 4))
    out = stacked(rows, (4, 4))
    out[0, 0, 0] += 1.0  # the caller's own array (add_events and decay_to build on it)
    assert np.array_equal(stacked(rows, (4, 4)), grams)


def test_add_reading_refuses_statistics_of_another_size() -> None:
    config = ModelConfig()  # 4×4 with the time trend
    with pytest.raises(ValueError, match="Gram matrix"):
        add_reading(packed(np.zeros((3, 3))), float("-inf"), 1.0, 0.0, 1.0, config)


@settings(max_examples=60, deadline=None)
@given(
    d=st.integers(2, 9),
    decayed=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_unrolled_gram_update_is_the_entrywise_expression_bit_for_bit(d, decayed, seed) -> None:
    """add_reading's and add_vectors' generated per-entry update computes, for
    every entry and each vector in turn, G_ij·old + v_i v_j·new (or
    G_ij + v_i v_j) in that order: numpy's elementwise operations in the same
    order give the same bits."""
    from model.evidence import _gram_updates

    rng = np.random.default_rng(seed)
    gram = rng.normal(size=(d, d)) * 10.0 ** rng.integers(-3, 4, size=(d, d))
    vectors = rng.normal(size=(3, d)) * 10.0 ** rng.integers(-3, 4, size=(3, d))
    olds, news = rng.uniform(0.0, 1.0, (2, 3)) if decayed else (np.ones(3), np.ones(3))
    expected = gram
    for vector, old, new in zip(vectors, olds, news, strict=True):
        outer = vector[:, None] * vector[None, :]
        expected = expected * old + outer * new if decayed else expected + outer
    got = _gram_updates(d, decayed)(packed(gram), vectors.tolist(), olds.tolist(), news.tolist())
    assert got == packed(expected)
