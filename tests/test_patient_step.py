"""The patients agent's pure steps (streams.patient_step), without Kafka or faust.

A simulated programme's raw records (bad records and duplicates included) go
through ``process_batch`` in batches, with a dict as the table. Judged against
the simulation's ground truth and an independent path: the statistics against
the batch computation over the unique valid readings
(``Programme.expected_statistics``), every dead letter against the injected bad
records and duplicates, a forced ``rescore`` against ``measure_scores`` on the
batch statistics.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
import random
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
from settling import Settling
from test_reliability import statistics_mismatch

import streams.patient_step as patient_step
from cli.programme import build_programme
from model.evidence import stacked
from streams.app import measure_models
from streams.catalogue import Catalogue
from streams.chunked_consumer import ChunkRecord
from streams.partitioning import key_partition
from streams.patient_state import PatientRecord
from streams.patient_step import (
    CACHED_BYTES_PER_VALUE_BYTE,
    RecordCache,
    StepContext,
    StepOutputs,
    batch_keys,
    by_patient,
    process_batch,
    rescore,
    step_bounds,
    transition_alert,
)
from streams.posterior_feed import PosteriorBook
from streams.schemas import Alert, EfficacyScore, Interval, JointEffect, JointScore
from streams.scoring import ScoreRow, efficacy_score_json, measure_scores
from streams.settings import Settings

MEASURE = "resting_heart_rate"  # the measure statistics_mismatch checks
PARTITIONS = 4
# The simulated readings are dated around now; no reading is too old to accept.
SETTINGS = Settings(max_age_days=36500.0, partitions=PARTITIONS)


@pytest.fixture(scope="module")
def programme():
    return build_programme(
        [MEASURE], num_patients=40, num_cohorts=4, obs_per_patient=12, design="crossover",
        seed=17, bad_fraction=0.05, duplicate_fraction=0.05,
    )  # fmt: skip


def context(posteriors: PosteriorBook | None = None) -> StepContext:
    catalogue = Catalogue.load()
    models = measure_models(catalogue, SETTINGS)
    return StepContext(catalogue, models, posteriors or PosteriorBook(), SETTINGS)


def raw_records(programme) -> list:
    return programme.as_read(SETTINGS.topic_prefix, PARTITIONS)


def run_batches(
    states: dict, records, ctx: StepContext, batch_size: int, cache: RecordCache | None = None
) -> list:
    """Every record through process_batch, ``batch_size`` at a time; the table
    ``states`` is updated in place. Returns each batch's outputs."""
    outputs = []
    for start in range(0, len(records), batch_size):
        batch = records[start : start + batch_size]
        keys = batch_keys(batch)
        saves, out = process_batch({k: states.get(k) for k in keys}, batch, ctx, cache=cache)
        states.update(saves)
        outputs.append(out)
    return outputs


def parsed(states: dict) -> dict[str, PatientRecord]:
    return {k: PatientRecord.model_validate_json(v) for k, v in states.items()}


def as_run(programme) -> SimpleNamespace:
    return SimpleNamespace(programme=programme, truth=programme.truth)


@pytest.mark.parametrize("batch_size", [1, 37, 100_000])
def test_statistics_equal_the_batch_computation_whatever_the_batch_size(programme, batch_size):
    states: dict[str, bytes] = {}
    outputs = run_batches(states, raw_records(programme), context(), batch_size)
    assert statistics_mismatch(as_run(programme), parsed(states)) is None
    truth = programme.truth
    accepted = sum(sum(o.accepted.values()) for o in outputs)
    # duplicates pass validation; the patient's state recognises them
    assert accepted == truth.enrollment_events + truth.valid_unique_readings + len(truth.duplicates)
    assert not any(o.scores for o in outputs)  # no posterior yet: nothing to score


def test_every_bad_record_and_duplicate_is_dead_lettered_with_its_bytes_and_origin(programme):
    records = raw_records(programme)
    outputs = run_batches({}, records, context(), 50)
    letters = [json.loads(m.value) for o in outputs for m in o.dead_letters]
    truth = programme.truth
    expected = Counter(b.reason for b in truth.bad_records)
    expected["duplicate"] += len(truth.duplicates)
    assert Counter(letter["reason"] for letter in letters) == expected
    counted = Counter()
    for o in outputs:
        counted.update(o.rejected)
    assert sum(counted.values()) == len(letters)
    at = {(r.topic, r.partition, r.offset): r for r in records}
    duplicate_ids = {d.event_id for d in truth.duplicates}
    for letter in letters:
        original = at[(letter["source_topic"], letter["partition"], letter["offset"])]
        assert base64.b64decode(letter["value_b64"]) == original.value
        if letter["reason"] == "duplicate":
            assert json.loads(original.value)["event_id"] in duplicate_ids


def test_a_replayed_batch_changes_no_statistics_and_resends_its_evidence(programme):
    records = raw_records(programme)
    states: dict[str, bytes] = {}
    ctx = context()
    run_batches(states, records, ctx, 200)
    last = records[-200:]  # delivered again after a crash before its offsets were committed
    saves, outputs = process_batch({k: states.get(k) for k in batch_keys(last)}, last, ctx)
    states.update(saves)
    assert statistics_mismatch(as_run(programme), parsed(states)) is None
    assert outputs.replays > 0 and not outputs.accepted.keys() - {"wearables", "labs", "pros"}
    # every patient with a valid reading in the replayed batch has its evidence re-sent
    valid_readers = {r.patient_id for r in programme.send_order()[-200:] if r.label == "valid"}
    forwarded = {
        item["patient_id"]
        for message in outputs.evidence
        for item in json.loads(message.value)["items"]
    }
    assert valid_readers and valid_readers <= forwarded


# 1: the failing record is always the first of its patient in its batch; 100000:
# one batch, which applied the patient's earlier readings to the record it breaks
@pytest.mark.parametrize("batch_size", [1, 25, 100000])
def test_an_event_whose_application_fails_is_dead_lettered_and_the_patient_continues(
    programme, monkeypatch, batch_size
):
    """A bug while applying one event: that event is dead-lettered as
    processing_error, the half-applied record is dropped and the patient
    continues from its state before it; every other reading counts."""
    records = raw_records(programme)
    victim = next(
        r for r in records[len(records) // 2 :]
        if r.topic.endswith("wearables") and r.value and b'"value"' in r.value
    )  # fmt: skip
    victim_id = json.loads(victim.value)["event_id"]
    apply_event = patient_step.apply_event

    def failing(record, event, models, *, copy=True):
        record, outcome = apply_event(record, event, models, copy=copy)  # mutates when not copy
        if getattr(event, "event_id", None) == victim_id:
            raise RuntimeError("injected failure after the record was changed")
        return record, outcome

    monkeypatch.setattr(patient_step, "apply_event", failing)
    states: dict[str, bytes] = {}
    outputs = run_batches(states, records, context(), batch_size)
    errors = [json.loads(m.value) for o in outputs for m in o.dead_letters
              if json.loads(m.value)["reason"] == "processing_error"]  # fmt: skip
    assert [(e["source_topic"], e["offset"]) for e in errors] == [(victim.topic, victim.offset)]
    patient = victim.key.decode()
    counts = parsed(states)[patient].measures[MEASURE]
    expected = programme.truth.patients[patient].valid_unique_readings[MEASURE]
    assert counts.count_exposed + counts.count_unexposed == expected - 1
    # nobody else lost or gained a reading
    others = {k: v for k, v in parsed(states).items() if k != patient}
    for key, record in others.items():
        stats = record.measures[MEASURE]
        assert (
            stats.count_exposed + stats.count_unexposed
            == programme.truth.patients[key].valid_unique_readings[MEASURE]
        )


def test_a_state_that_cannot_be_read_is_dead_lettered_and_logged_without_the_patient_id(
    programme, caplog
):
    """A stored state pydantic rejects (its error quotes the input, patient id
    included): the patient's events are dead-lettered as processing_error with
    the detail, while the ERROR log line names the failure without the id (the
    traceback is at DEBUG)."""
    records = raw_records(programme)
    states: dict[str, bytes] = {}
    run_batches(states, records[: len(records) // 2], context(), 100)
    patient = next(iter(states))
    states[patient] = json.dumps({"patient_id": patient, "cohort": [patient]}).encode()
    caplog.set_level(logging.DEBUG, logger="streams.patient_step")
    outputs = run_batches(states, records[len(records) // 2 :], context(), 100)
    letters = [json.loads(m.value) for o in outputs for m in o.dead_letters]
    broken = [d for d in letters if d["reason"] == "processing_error"]
    assert broken and all(patient in d["detail"] for d in broken)
    loud = [r for r in caplog.records if r.levelno >= logging.INFO]
    assert any("could not read a patient's stored state" in r.getMessage() for r in loud)
    for record in loud:
        assert patient not in record.getMessage() and not record.exc_info
    assert any(r.exc_info for r in caplog.records if r.levelno == logging.DEBUG)


@pytest.mark.slow
def posterior_of(programme, ctx: StepContext):
    """A cheap population fit on the programme's complete statistics, offered
    to ``ctx``'s posterior book; returns the fit."""
    from model.config import SVIConfig
    from streams.population_book import PopulationModel

    ids = sorted(programme.truth.patients)
    model = ctx.models[MEASURE]
    stats = programme.expected_statistics(MEASURE, model, ids)
    cohorts = sorted({programme.truth.patients[p].cohort for p in ids})
    index = np.array([cohorts.index(programme.truth.patients[p].cohort) for p in ids], np.int32)
    svi = SVIConfig(fresh_steps=200, update_steps=50)
    fit = PopulationModel(MEASURE, model, svi, max_rounds=0).fit(stats, index, cohorts)
    ctx.posteriors.offer(fit.message)
    return fit


def test_published_scores_equal_the_float64_mixture_of_the_programme(programme):
    """The step's published scores of a simulated programme against the same
    400-draw mixtures summarised independently in float64: each patient's
    components from its statistics (model.likelihood), brentq on the mixture
    CDF for the interval ends, the probabilities summed directly. Mean and sd
    are float64 moments (1e-9 sd); the interval ends within 1e-5 sd (the
    proven QUANTILE_TOLERANCE of 1e-6 component sd plus float32's resolution of
    q, ~1e-6 (|mean| + sd)); the probabilities within 1e-5 (float32 sums of 400
    terms). All far below the mixture's Monte Carlo error (~1/√400 of its
    spread)."""
    import jax
    from scipy import optimize
    from scipy import stats as sps

    from model.likelihood import patient_effects_given_theta

    ctx = context()
    fit = posterior_of(programme, ctx)
    states: dict[str, bytes] = {}
    latest = {}
    for outputs in run_batches(states, raw_records(programme), ctx, 1000):
        latest.update({m.key.decode(): json.loads(m.value) for m in outputs.scores})
    records = parsed(states)
    ids = sorted(latest)
    assert len(ids) == len(programme.truth.patients)
    model = ctx.models[MEASURE]
    posterior = ctx.posteriors[MEASURE]
    spec = ctx.catalogue.get(MEASURE)
    gram = stacked([records[p].measures[MEASURE].gram for p in ids], model.stat_shape)
    cohort_mean, cohort_var = posterior.cohort_posterior([records[p].cohort for p in ids])
    comps = jax.vmap(patient_effects_given_theta, in_axes=(0, None, 0, 0, None))(
        posterior.draws, gram, cohort_mean, cohort_var, model.structure
    )
    to_raw = model.standardization.effect_to_raw(1.0)
    means = np.asarray(comps.mean, dtype=float) * to_raw
    sds = np.sqrt(np.asarray(comps.variance, dtype=float)) * abs(to_raw)
    sign = 1.0 if spec.direction == "higher" else -1.0
    assert fit.message.version == posterior.version and means.shape == (400, len(ids))
    for j, patient in enumerate(ids):
        (score,) = latest[patient]["measures"]
        effect = score["effect"]
        m, s = means[:, j], sds[:, j]
        mean = m.mean()
        sd = np.sqrt(np.mean(s**2 + m**2) - mean**2)
        assert abs(effect["mean"] - mean) <= 1e-9 * sd
        assert abs(effect["sd"] - sd) <= 1e-9 * sd
        for key, level in (("lower", 0.05), ("upper", 0.95)):
            root = optimize.brentq(
                lambda q, m=m, s=s, level=level: sps.norm.cdf(q, m, s).mean() - level,
                mean - 20 * sd, mean + 20 * sd, xtol=1e-12 * sd,
            )  # fmt: skip
            assert abs(effect[key] - root) <= 1e-5 * sd, (patient, key)
        p_mcid = sps.norm.cdf((sign * m - spec.mcid) / s).mean()
        assert score["p_benefit_ge_mcid"] == pytest.approx(p_mcid, abs=1e-5)
        assert score["p_benefit_gt_0"] == pytest.approx(sps.norm.cdf(sign * m / s).mean(), abs=1e-5)


def _letter(message) -> dict:
    """A dead letter without the moment it was written."""
    letter = json.loads(message.value)
    del letter["rejected_at"]
    return letter


@pytest.mark.parametrize("capacity", [50_000, 10**9])
def test_the_record_cache_changes_no_table_value_and_no_output(programme, capacity):
    """The same batches with and without a RecordCache (evicting, or holding
    everyone) give byte-identical table values and outputs, also when a
    patient's table value is replaced between batches by another writer (a
    restored changelog: the cached record must not be used) and across a
    rescore."""
    records = raw_records(programme)
    ctx = context()
    posterior_of(programme, ctx)
    cache = RecordCache(capacity)
    plain: dict[str, bytes] = {}
    cached: dict[str, bytes] = {}
    third = len(records) // 3
    run_batches(plain, records[:third], ctx, 40)
    run_batches(cached, records[:third], ctx, 40, cache)
    assert cached == plain
    early = dict(plain)
    run_batches(plain, records[third : 2 * third], ctx, 40)
    run_batches(cached, records[third : 2 * third], ctx, 40, cache)
    assert cached == plain and cache.bytes <= capacity
    assert cache.bytes == CACHED_BYTES_PER_VALUE_BYTE * sum(
        len(cached[p]) for p in cached if p in cache
    )
    for patient in sorted(plain)[:5]:  # another worker's older copy restored
        plain[patient] = cached[patient] = early[patient]
    plain_out = run_batches(plain, records[2 * third :], ctx, 40)
    cached_out = run_batches(cached, records[2 * third :], ctx, 40, cache)
    assert cached == plain
    for a, b in zip(plain_out, cached_out, strict=True):
        assert (a.scores, a.evidence, a.alerts) == (b.scores, b.evidence, b.alerts)
        assert [_letter(m) for m in a.dead_letters] == [_letter(m) for m in b.dead_letters]
    assert rescore(plain, MEASURE, ctx, force=True) == rescore(
        cached, MEASURE, ctx, force=True, cache=cache
    )
    if capacity > 4 * sum(map(len, plain.values())):
        assert cache.hits > 0


def test_scores_count_every_reading_and_a_forced_rescore_equals_the_batch_statistics_score(
    programme,
):
    """With a posterior: every batch republishes the score of each patient whose
    evidence it changed (so a patient's latest score counts all its readings);
    a forced rescore publishes every patient's score as measure_scores gives it
    on the batch statistics (the independent path); a rescore under the version
    every score is already under does nothing, and an unforced one under a new
    version with the same draws publishes nothing."""
    ctx = context()
    records = raw_records(programme)
    half = len(records) // 2
    states: dict[str, bytes] = {}
    run_batches(states, records[:half], ctx, 100)
    ids = sorted(programme.truth.patients)
    model = ctx.models[MEASURE]
    fit = posterior_of(programme, ctx)

    latest = {}
    for outputs in run_batches(states, records[half:], ctx, 50):
        latest.update({m.key.decode(): json.loads(m.value) for m in outputs.scores})
    late_readers = {r.patient_id for r in programme.send_order()[half:] if r.label == "valid"}
    assert late_readers and late_readers <= set(latest)
    for patient in late_readers:
        (measure,) = latest[patient]["measures"]
        assert (
            measure["count_exposed"] + measure["count_unexposed"]
            == (programme.truth.patients[patient].valid_unique_readings[MEASURE])
        ), patient

    # A new version (the same draws) rescores everyone.
    ctx.posteriors.offer(fit.message.model_copy(update={"version": fit.message.version + 1}))
    saves, outputs = rescore(states, MEASURE, ctx, force=True)
    assert set(saves) == set(ids) == set(outputs.scored_patients())
    published = {m.key.decode(): json.loads(m.value) for m in outputs.scores}
    expected = measure_scores(
        ctx.posteriors[MEASURE],
        Settling(programme, "", MEASURE).statistics(),
        [programme.truth.patients[p].cohort for p in ids],
        [[] for _ in ids],
        ctx.catalogue.get(MEASURE),
        model,
        ctx.rule,
        previous=[json.loads(states[p])["published"][MEASURE]["classification"] for p in ids],
    )
    for patient, score in zip(ids, expected, strict=True):
        (measure,) = published[patient]["measures"]
        assert (
            measure["count_exposed"] + measure["count_unexposed"]
            == (programme.truth.patients[patient].valid_unique_readings[MEASURE])
        )
        assert measure["population_version"] == fit.message.version + 1
        assert abs(measure["effect"]["mean"] - score.effect.mean) <= 1e-6 * score.effect.sd
        assert abs(measure["effect"]["sd"] - score.effect.sd) <= 1e-6 * score.effect.sd
    for message in outputs.scores:  # built without validation: check them here
        EfficacyScore.model_validate_json(message.value)
    states.update(saves)
    # Every patient's score is now under the current version: nothing to
    # rescore, even forced (a restart handed the same posterior again).
    assert rescore(states, MEASURE, ctx, force=True) == ({}, StepOutputs())
    # Under a newer version with the same draws, an unforced rescore publishes
    # nothing: no score moved materially.
    ctx.posteriors.offer(fit.message.model_copy(update={"version": fit.message.version + 2}))
    again, outputs = rescore(states, MEASURE, ctx)
    assert not again and not outputs.scores

    # The longest patient id the schema allows still gives valid, stable event ids.
    longest = PatientRecord(patient_id="p" * 128, cohort="c")
    message = EfficacyScore.model_validate_json(
        efficacy_score_json(longest, [ScoreRow.of(expected[0])], ctx.weights, ctx.rule)
    )
    again = efficacy_score_json(longest, [ScoreRow.of(expected[0])], ctx.weights, ctx.rule)
    assert message.event_id == json.loads(again)["event_id"]
    other = expected[0].model_copy(update={"classification": "non_responder"})
    alert = transition_alert("p" * 128, "uncertain", ScoreRow.of(other))
    Alert.model_validate_json(alert.model_dump_json())


def as_the_model_writes_it(value: bytes) -> bytes:
    """``value`` read into EfficacyScore (validated) and serialised by the model."""
    return EfficacyScore.model_validate_json(value).model_dump_json().encode()


def test_score_messages_are_byte_for_byte_the_models_serialisation(programme):
    """The score messages are written without building EfficacyScore
    (scoring.efficacy_score_json); each must be a valid EfficacyScore whose own
    serialisation is the same bytes (field order, defaults, float and time
    formatting): every score of a simulated programme, each patient's table copy
    of it (``published_score_json``), and a score of two measures with a composite, a
    joint group's score and floats whose shortest form is an exponent."""
    ctx = context()
    posterior_of(programme, ctx)
    states: dict[str, bytes] = {}
    sent = [m for o in run_batches(states, raw_records(programme), ctx, 50) for m in o.scores]
    assert len({m.key for m in sent}) == len(programme.truth.patients)
    for message in sent:
        assert as_the_model_writes_it(message.value) == message.value
    for record in parsed(states).values():
        published = record.published_score_json
        assert published in {m.value for m in sent if m.key == record.patient_id.encode()}

    first = parsed(states)[min(states)]
    (score,) = measure_scores(
        ctx.posteriors[MEASURE],
        [first.measures[MEASURE]],
        [first.cohort],
        [[]],
        ctx.catalogue.get(MEASURE),
        ctx.models[MEASURE],
        ctx.rule,
    )
    odd = score.model_copy(
        update={
            "measure": "zz_other",
            "effect": Interval(mean=1e-7, sd=1.5e16, lower=-2.5e-300, upper=0.1),
            "recommended_action": 'review \u00e9 "now"',
        }
    )
    effect = JointEffect(
        measure=MEASURE, unit="bpm", direction="lower", mcid=5.0, effect=score.effect,
        p_benefit_ge_mcid=0.25, p_benefit_gt_0=0.75, classification="uncertain",
    )  # fmt: skip
    joint = JointScore(
        group="cardio", effects=[effect], responsiveness=Interval(mean=0.1, sd=1.0, lower=-1.5,
        upper=1.7), p_above_population=1 / 3, population_version=7,
    )  # fmt: skip
    weights = {MEASURE: 1.0, "zz_other": 2.0}
    rows = [ScoreRow.of(odd), ScoreRow.of(score)]
    value = efficacy_score_json(first, rows, weights, ctx.rule, [joint])
    assert as_the_model_writes_it(value) == value
    message = json.loads(value)
    assert [m["measure"] for m in message["measures"]] == [MEASURE, "zz_other"]
    assert message["composite"]["measures"] == [MEASURE, "zz_other"]
    assert message["joint"][0]["group"] == "cardio"


def test_a_record_on_another_partition_than_its_keys_is_rerouted_not_applied(programme):
    """A producer with librdkafka's default partitioner puts records elsewhere
    than murmur2(key): each keyed record that arrives on the wrong partition is
    sent on, unchanged, to its key's partition of the same topic (where the
    patient's owner reads it) and counted; read there, it counts once."""
    records = programme.as_read(SETTINGS.topic_prefix, PARTITIONS)
    misplaced = [
        ChunkRecord(r.key, r.value, r.topic, (r.partition + 1) % PARTITIONS, r.offset, r.timestamp)
        if r.key and i % 7 == 0 else r
        for i, r in enumerate(records)
    ]  # fmt: skip
    moved = sum(1 for a, b in zip(records, misplaced, strict=True) if a.partition != b.partition)
    states: dict[str, bytes] = {}
    outputs = run_batches(states, misplaced, context(), 50)
    reroutes = [(topic, m) for o in outputs for topic, m in o.reroutes]
    assert len(reroutes) == sum(sum(o.rerouted.values()) for o in outputs) == moved
    for _, message in reroutes:
        assert message.partition == key_partition(message.key, PARTITIONS)
    # the owner of the right partition reads them (new offsets there)
    again = [ChunkRecord(m.key, m.value, topic, m.partition, 10_000 + i, None)
             for i, (topic, m) in enumerate(reroutes)]  # fmt: skip
    run_batches(states, again, context(), 50)
    assert statistics_mismatch(as_run(programme), parsed(states)) is None


def test_steps_are_bounded_by_records_and_by_patients():
    """step_bounds cuts a run of records, in order and without a gap, into
    steps of at most max_records records naming at most max_patients
    patients, each as long as those bounds allow; keyless records count as a
    patient each. Checked against a brute force: the greedy cut of every
    prefix."""
    rng = random.Random(7)
    for _ in range(300):
        keys = [
            None if rng.random() < 0.05 else str(rng.randrange(rng.randint(1, 30))).encode()
            for _ in range(rng.randint(0, 120))
        ]
        max_records, max_patients = rng.randint(1, 40), rng.randint(1, 12)
        ends = step_bounds(keys, max_records, max_patients)
        expected, start = [], 0
        while start < len(keys):
            end = start
            while end < len(keys):
                step = keys[start : end + 1]
                patients = len({k for k in step if k is not None}) + step.count(None)
                if len(step) > max_records or patients > max_patients:
                    break
                end += 1
            expected.append(end)
            start = end
        assert ends == expected


def test_a_take_grouped_by_patient_ends_in_the_same_states_and_scores_with_fewer_messages(
    programme,
):
    """The patients agent processes a take's records grouped by patient
    (by_patient). Each patient's records keep their order, so every table value
    ends as in the order read and each patient's last published score is the
    same, but for the responder call inside the decision rule's hysteresis band:
    that call depends on the previous one published, and a patient with several
    records in a step is scored once for all of them, so fewer score messages
    go out (as with any step holding several of a patient's records)."""
    ctx = context()
    posterior_of(programme, ctx)
    records = raw_records(programme)
    take = 200  # records acknowledged together
    grouped = [
        record
        for start in range(0, len(records), take)
        for record in by_patient(records[start : start + take], lambda r: r.key)
    ]
    assert sorted(map(id, grouped)) == sorted(map(id, records))
    for start in range(0, len(records), take):
        part = grouped[start : start + take]
        for patient in {r.key for r in part}:
            mine = [r.offset for r in records[start : start + take] if r.key == patient]
            assert [r.offset for r in part if r.key == patient] == mine
        keys = [r.key for r in part]
        assert keys == sorted(keys, key=lambda k: k or b"")
    runs = {}
    for name, order in (("read", records), ("grouped", grouped)):
        states: dict[str, bytes] = {}
        outputs = run_batches(states, order, ctx, 50)
        last = {m.key: m.value for out in outputs for m in out.scores}
        count = sum(len(out.scores) for out in outputs)
        runs[name] = (states, last, count)
    (states, last, count), (grouped_states, grouped_last, grouped_count) = runs.values()
    assert grouped_states.keys() == states.keys()
    assert grouped_last.keys() == last.keys() and len(last) == len(programme.truth.patients)
    assert grouped_count < count
    from model.scores import classify

    def stays(measure: dict, call: str) -> bool:
        """Whether the decision rule keeps ``call`` on ``measure``'s numbers
        when it was the previous call (model.scores.classify)."""
        kept = classify(
            np.array([measure["p_benefit_ge_mcid"]]), np.array([measure["p_benefit_gt_0"]]),
            np.array([measure["count_exposed"]]), np.array([measure["count_unexposed"]]),
            ctx.rule, previous=np.array([call], dtype=object),
        )  # fmt: skip
        return kept[0] == call

    banded = 0
    for key in states:
        value, grouped_value = json.loads(states[key]), json.loads(grouped_states[key])
        for record in (value, grouped_value):  # the last score, compared below
            del record["published"], record["published_score_json"]
        assert grouped_value == value
    for key in last:
        score, grouped_score = json.loads(last[key]), json.loads(grouped_last[key])
        for measure, grouped_measure in zip(
            score["measures"], grouped_score["measures"], strict=True
        ):
            calls = {m.pop("classification") for m in (measure, grouped_measure)}
            actions = {m.pop("recommended_action") for m in (measure, grouped_measure)}
            if len(calls) > 1:  # inside the band: each call is one the rule keeps there
                banded += 1
                assert all(stays(measure, call) for call in calls), (key, calls)
            else:
                assert len(actions) == 1
        assert grouped_score == score
    assert banded <= len(last) // 4


def _cached(patient_id: str, padding: int = 0):
    """A patient's record and its table value (``padding`` spaces longer)."""
    from streams.patient_state import PatientRecord

    record = PatientRecord(patient_id=patient_id)
    return record, record.model_dump_json().encode() + b" " * padding


def test_the_record_cache_keeps_about_the_share_that_fits_of_patients_in_cycles() -> None:
    """Patients touched in a cycle (a backfill in event-time order, devices
    syncing in turn), three times as many as fit: the cache keeps about the
    third that fits for their next turn (least-recently-used eviction would
    keep none, random eviction of every miss ~6%); the bytes held never exceed
    the budget, and a record is used only for the table value it was kept with."""
    patients = [f"p{i:04d}" for i in range(3000)]  # values of one length
    kept = {p: _cached(p) for p in patients}
    cost = CACHED_BYTES_PER_VALUE_BYTE * len(kept[patients[0]][1])
    cache = RecordCache(capacity_bytes=cost * 1000, seed=1)
    hits_by_cycle = []
    for _ in range(4):
        before = cache.hits
        for patient in patients:
            record, value = kept[patient]
            found = cache.take(patient, value)
            assert found == record  # the kept object on a hit, a parse of the value otherwise
            cache.put(patient, value, record)
            assert cache.bytes <= cache.capacity_bytes
        hits_by_cycle.append(cache.hits - before)
    assert len(cache) == 1000
    assert cache.hits + cache.misses == 4 * 3000  # every lookup of a stored value counted
    # after the first cycle ~1/3 of the patients hit: a full cache admits a
    # new record with probability 0.1, so it turns over slowly (a simulation
    # of this loop gives 0.31 over later cycles); the bound is ±0.1
    assert hits_by_cycle[0] == 0
    assert all(abs(hits / 3000 - 1 / 3) < 0.1 for hits in hits_by_cycle[1:])
    held = cache.keys()[0]
    stale = kept[held][1] + b" "  # another writer's value: a miss, and the entry is dropped
    assert cache.take(held, stale) is not kept[held][0]
    assert held not in cache and len(cache) == 999


def test_the_record_cache_refuses_what_cannot_fit_and_frees_what_it_hands_out() -> None:
    def sized(patient_id: str, length: int):
        return _cached(patient_id, padding=length - len(_cached(patient_id)[1]))

    big, big_value = _cached("big", padding=1000)
    cache = RecordCache(capacity_bytes=CACHED_BYTES_PER_VALUE_BYTE * 1000)
    cache.put("big", big_value, big)  # never kept: more than the whole budget
    assert len(cache) == 0 and cache.bytes == 0
    (a, a_value), (b, b_value) = sized("a", 400), sized("b", 400)
    cache.put("a", a_value, a)
    cache.put("b", b_value, b)
    assert cache.bytes == CACHED_BYTES_PER_VALUE_BYTE * 800
    assert cache.take("a", a_value) is a
    assert cache.bytes == CACHED_BYTES_PER_VALUE_BYTE * 400 and cache.keys() == ["b"]
    grown, grown_value = sized("a", 700)  # a step saved it, longer: "b" makes room
    cache.put("a", grown_value, grown)
    assert cache.keys() == ["a"] and cache.bytes == CACHED_BYTES_PER_VALUE_BYTE * 700
    # a record the full cache did not hand out is admitted one time in ten
    admitted = 0
    for i in range(400):
        record, value = sized(f"n{i:03d}", 700)
        cache.put(f"n{i:03d}", value, record)
        admitted += f"n{i:03d}" in cache
        assert len(cache) == 1
    assert 20 <= admitted <= 60  # binomial(400, 0.1): mean 40, sd 6


def test_a_large_steps_conflict_check_takes_an_evenly_spaced_sample_of_its_readings(programme):
    """Of a step of more events than DriftConfig.conflict_readings_per_step, the
    prior-data conflict check gets a sample: at most that many readings, spread
    over the step's patients, each with the residual it has when every reading
    is checked (a reading's residual depends on its patient's evidence before
    it, not on the sample); the table values and scores are those of the
    unsampled step."""
    from monitoring.drift import DriftConfig

    records = raw_records(programme)
    half = len(records) // 2
    runs = []
    for cap in (100_000, 13):
        settings = SETTINGS.model_copy(
            update={"drift": DriftConfig(conflict_readings_per_step=cap)}
        )
        ctx = dataclasses.replace(context(), settings=settings)
        states: dict[str, bytes] = {}
        run_batches(states, records[:half], ctx, 100_000)
        posterior_of(programme, ctx)
        (outputs,) = run_batches(states, records[half:], ctx, 100_000)
        residuals = dict(
            zip(
                [r.origin for r in outputs.readings[MEASURE]],
                outputs.residuals[MEASURE]().tolist(),
                strict=True,
            )
        )
        runs.append((states, outputs, residuals))
    (states, outputs, every), (sampled_states, sampled_outputs, sample) = runs
    assert len(every) > 100 and 13 // 2 <= len(sample) <= 13
    patient_of = {f"{r.topic}:{r.partition}:{r.offset}": r.key for r in records}
    assert len({patient_of[origin] for origin in sample}) >= 13 // 2
    order = list(every)  # the step's readings in order: the sample spans them
    positions = sorted(order.index(origin) for origin in sample)
    assert positions[-1] - positions[0] >= len(order) // 2
    for origin, z in sample.items():
        assert z == pytest.approx(every[origin], rel=1e-9, abs=1e-12)
    assert sampled_states == states
    assert [m.value for m in sampled_outputs.scores] == [m.value for m in outputs.scores]


def test_a_steps_residuals_are_those_of_its_readings_under_the_posterior(programme):
    """A step dispatches the prior-data conflict check's residuals of its
    readings to the device (computed while it scores and saves): once waited
    for, they are reading_residuals of those readings, one per reading, and a
    step without a posterior has no readings to check."""
    from streams.scoring import reading_residuals

    ctx = context()
    records = raw_records(programme)
    half = len(records) // 2
    states: dict[str, bytes] = {}
    (before,) = run_batches(states, records[:half], ctx, 100_000)
    assert not before.readings and not before.residuals  # no posterior yet
    posterior_of(programme, ctx)
    (outputs,) = run_batches(states, records[half:], ctx, 100_000)
    readings = outputs.readings[MEASURE]
    assert len(readings) > 50 and set(outputs.residuals) == {MEASURE}
    residuals = outputs.residuals[MEASURE]()
    expected = reading_residuals(ctx.posteriors[MEASURE], readings, ctx.models[MEASURE])
    assert residuals.shape == (len(readings),)
    np.testing.assert_array_equal(residuals, expected)
