"""PopulationBook.put_many: the population agent records an evidence message's
patients at once; the book must hold exactly what recording them one at a time
in arrival order would (last write wins, a copy counting fewer readings is
stale), checked against a plain dictionary of the winners."""

from __future__ import annotations

import random

import numpy as np
from test_selection import STREAM_MEASURE, STREAM_MODEL, _evidence

from streams.population_book import PopulationBook
from streams.schemas import PatientEvidence

MODEL = STREAM_MODEL.model_copy(
    update={"covariates": ("age",), "grouping_levels": ("cluster",), "cohort_level": True}
)


def _variants(seed: int) -> list[PatientEvidence]:
    """Evidence of 40 patients in several versions each: more readings, stale
    copies (fewer readings), another cohort, covariates, groups, with and
    without recent-window statistics, shuffled."""
    rng = random.Random(seed)
    base = _evidence(seed, num_patients=150, num_cohorts=4, obs_per_patient=6)
    items = []
    for evidence in base:
        for version in range(rng.randint(1, 4)):
            extra = rng.choice([-1, 0, 1, 2]) if version else 0
            gram = (np.asarray(evidence.gram) * rng.uniform(0.5, 2.0)).tolist()
            if rng.random() < 0.5:  # as the worker writes them (PatientEvidence)
                gram = np.asarray(gram, dtype="<f8").tobytes()
            fields = {
                "count_exposed": max(0, evidence.count_exposed + extra),
                "gram": gram,
                "reference_time": evidence.reference_time + rng.uniform(0, 3),
                "cohort": rng.choice([evidence.cohort, "clinic-new"]),
                "covariates": [rng.uniform(20, 80)],
                "groups": rng.choice([{}, {"cluster": "a"}, {"cluster": "b"}]),
                "recent_gram": rng.choice([None, gram]),
            }
            items.append(evidence.model_copy(update=fields))
    rng.shuffle(items)
    return items


def _matrix(gram) -> np.ndarray:
    """A Gram matrix as numbers, from lists or float64 bytes."""
    if isinstance(gram, bytes):
        return np.frombuffer(gram, dtype="<f8").reshape(MODEL.stat_shape)
    return np.asarray(gram)


def _winners(items: list[PatientEvidence]) -> dict[str, PatientEvidence]:
    """What each patient's row must hold: the last item not counting fewer
    readings than the one held (insertion order: first arrival)."""
    held: dict[str, PatientEvidence] = {}
    for item in items:
        readings = item.count_exposed + item.count_unexposed
        current = held.get(item.patient_id)
        if current is None or readings >= current.count_exposed + current.count_unexposed:
            held[item.patient_id] = item
    return held


def test_recording_messages_at_once_holds_what_recording_items_in_order_would() -> None:
    items = _variants(3)
    book = PopulationBook(STREAM_MEASURE, MODEL)
    recorded = 0
    rng = random.Random(5)
    first: dict[str, PatientEvidence] = {}
    for item in items:  # a first message naming every patient once: the book grows in it
        first.setdefault(item.patient_id, item)
    items = [*first.values(), *(e for e in items if first[e.patient_id] is not e)]
    messages: list[list[PatientEvidence]] = [list(first.values()), []]
    limit, repeats = rng.randint(1, 100), rng.random() < 0.2
    for item in items[len(first) :]:  # then messages of 1-100 items; most name a patient
        # once, as the worker's do, some twice (recorded one at a time)
        current = messages[-1]
        named = any(e.patient_id == item.patient_id for e in current)
        if len(current) >= limit or (named and not repeats):
            messages.append([])
            limit, repeats = rng.randint(1, 100), rng.random() < 0.2
        messages[-1].append(item)
    assert any(len({e.patient_id for e in m}) == len(m) > 64 for m in messages)
    assert any(len({e.patient_id for e in m}) < len(m) for m in messages)
    for message in messages:  # in arrival order
        recorded += book.put_many(message)
    winners = _winners(items)
    assert book.patient_ids == list(winners)
    n = book.num_patients
    expected = list(winners.values())
    assert np.array_equal(book._gram[:n], [_matrix(e.gram) for e in expected])
    recent = [
        np.zeros(MODEL.stat_shape) if e.recent_gram is None else _matrix(e.recent_gram)
        for e in expected
    ]
    assert np.array_equal(book._recent[:n], recent)
    assert np.array_equal(book._reference[:n], [e.reference_time for e in expected])
    assert [book.cohorts[c] for c in book._cohort[:n]] == [e.cohort for e in expected]
    assert np.array_equal(
        book._readings[:n], [e.count_exposed + e.count_unexposed for e in expected]
    )
    labels = book.group_labels[0]
    assert [labels[g] for g in book._groups[:n, 0]] == [
        e.groups.get("cluster", "") for e in expected
    ]
    assert np.allclose(book._covariates[:n, 0], [e.covariates[0] for e in expected])
    # every item recorded that was not stale when it came, and only those
    one_by_one = PopulationBook(STREAM_MEASURE, MODEL)
    assert recorded == sum(one_by_one.put(item) for item in items)
    assert recorded == book.changes_since_fit
    assert recorded < len(items)  # the variants include stale copies
