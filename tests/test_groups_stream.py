"""Several grouping levels through the stream's pure steps, without Kafka
(issue 15 item 7).

A simulated programme whose enrolments carry a ``cluster`` attribute (a
grouping level of resting heart rate in the catalogue, crossed with the
clinics; missing for some patients) goes through ``process_batch``; the
evidence it emits feeds a PopulationBook and one population fit, whose
posterior (with the groups' joint posterior per draw) then scores every
patient (``rescore``). Judged against the batch computation with the same
levels: the statistics (Programme.expected_statistics), the likelihood the fit
sees (model.likelihood.collapsed_loglik on the batch statistics and group
indices) and every patient's score (model.scores.summarize_effects, the scoring
``efficacy fit`` runs, under the posterior's own draws). Bad cluster values are
dead-lettered as ``invalid_group`` and nothing is lost.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cli.programme import build_programme
from model.config import DecisionRule
from model.evidence import stacked
from model.likelihood import collapsed_loglik
from model.scores import summarize_effects
from model.subgroups import summarize_subgroups
from streams.app import measure_models
from streams.catalogue import DEFAULT_CATALOGUE, Catalogue
from streams.chunked_consumer import ChunkRecord
from streams.partitioning import key_partition
from streams.patient_state import PatientRecord
from streams.patient_step import StepContext, batch_keys, process_batch, rescore
from streams.population_book import PopulationBook, PopulationModel, StructureSelectionRun
from streams.posterior_feed import PosteriorBook
from streams.schemas import MISSING_GROUP, Enrollment, EvidenceBatch
from streams.scoring import MeasurePosterior, reading_residuals
from streams.settings import Settings
from streams.subgroup_scores import BookSnapshot, subgroup_step

MEASURE = "resting_heart_rate"
PARTITIONS = 2
SETTINGS = Settings(max_age_days=36500.0, partitions=PARTITIONS)
CLUSTERS = ("north", "south", "east")


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory) -> Catalogue:
    """The shipped catalogue with ``cluster`` a grouping level of the measure."""
    text = DEFAULT_CATALOGUE.read_text().replace(
        f"\n[{MEASURE}]\n", f'\n[{MEASURE}]\ngrouping_levels = ["cluster"]\n', 1
    )
    text += '\n[subgroups.first-clinic]\ncohorts = ["clinic-00"]\n'

    path = tmp_path_factory.mktemp("catalogue") / "measures.toml"
    path.write_text(text)
    return Catalogue.load(path)


def with_clusters(programme, seed: int):
    """The programme with a cluster attribute on every enrolment (none for about
    one patient in eight) and each patient's cluster; the readings are as
    simulated (the clusters are crossed with the clinics)."""
    rng = np.random.default_rng(seed)
    cluster_of: dict[str, str | None] = {}
    enrolments = []
    for record in programme.records["enrollments"]:
        if record.label != "enrollment":
            enrolments.append(record)
            continue
        event = json.loads(record.value)
        cluster = None if rng.uniform() < 0.125 else CLUSTERS[int(rng.integers(len(CLUSTERS)))]
        if cluster is not None:
            event["attributes"]["cluster"] = cluster
        cluster_of[record.patient_id] = cluster
        enrolments.append(dataclasses.replace(record, value=json.dumps(event).encode()))
    records = {**programme.records, "enrollments": enrolments}
    return dataclasses.replace(programme, records=records), cluster_of


def bad_enrolments(start_offset: int) -> list[ChunkRecord]:
    """Enrolments whose cluster cannot be a group."""
    cases = [("blank", ""), ("padded", " north"), ("control", "no\x00rth"), ("long", "x" * 129)]
    records = []
    for k, (patient, cluster) in enumerate(cases):
        event = Enrollment(
            event_id=f"bad-cluster-{k}", event_time="2026-01-02T00:00:00Z", patient_id=patient,
            cohort="clinic-0", attributes={"cluster": cluster},
        )  # fmt: skip
        key = patient.encode()
        topic = f"{SETTINGS.topic_prefix}enrollments"
        partition = key_partition(key, PARTITIONS)
        value = event.model_dump_json().encode()
        records.append(ChunkRecord(key, value, topic, partition, start_offset + k, None))
    return records


def run(records, context) -> tuple[dict[str, bytes], list]:
    states: dict[str, bytes] = {}
    outputs = []
    for start in range(0, len(records), 500):
        batch = records[start : start + 500]
        saves, out = process_batch({k: states.get(k) for k in batch_keys(batch)}, batch, context)
        states.update(saves)
        outputs.append(out)
    return states, outputs


def test_two_levels_in_the_stream_equal_the_batch_computation(catalogue):
    models = measure_models(catalogue, SETTINGS)
    model = models[MEASURE]
    assert model.grouping_levels == ("cluster",) and model.cohort_level
    simulated = build_programme(
        [MEASURE], catalogue=catalogue, num_patients=120, num_cohorts=4, obs_per_patient=16,
        seed=31,
    )  # fmt: skip
    programme, cluster_of = with_clusters(simulated, seed=31)
    context = StepContext(catalogue, models, PosteriorBook(), SETTINGS)
    records = programme.as_read(SETTINGS.topic_prefix, PARTITIONS) + bad_enrolments(10_000)
    states, outputs = run(records, context)

    letters = [json.loads(m.value) for o in outputs for m in o.dead_letters]
    assert [letter["reason"] for letter in letters] == ["invalid_group"] * 4
    assert all("'cluster'" in letter["detail"] for letter in letters)
    accepted = sum(sum(o.accepted.values()) for o in outputs)
    assert accepted + len(letters) == len(records)  # nothing lost

    # The statistics and the groups the patients' records keep.
    patients = sorted(programme.truth.patients)
    saved = {p: PatientRecord.model_validate_json(states[p]) for p in patients}
    for p in patients:
        expected = {} if cluster_of[p] is None else {"cluster": cluster_of[p]}
        assert saved[p].groups == expected
    batch = programme.expected_statistics(MEASURE, model, patients)
    gram = stacked([saved[p].measures[MEASURE].gram for p in patients], model.stat_shape)
    np.testing.assert_allclose(gram, batch.gram, rtol=1e-9, atol=1e-8)

    book = PopulationBook(MEASURE, model)
    for o in outputs:
        for message in o.evidence:
            for item in EvidenceBatch.model_validate_json(message.value).items:
                book.put(item)
    assert book.num_patients == len(patients)
    stats, cohort, cohorts = book.snapshot()
    groups = book.groups_snapshot()
    assert sorted(groups.labels[0]) == sorted([*CLUSTERS, MISSING_GROUP])

    # The batch computation's indices: cohorts and clusters in sorted order.
    truth = programme.truth.patients
    cohort_labels = sorted({truth[p].cohort for p in patients})
    cluster_labels = sorted({cluster_of[p] or MISSING_GROUP for p in patients})
    batch_cohort = np.array([cohort_labels.index(truth[p].cohort) for p in patients])
    batch_cluster = np.array([[cluster_labels.index(cluster_of[p] or "")] for p in patients])
    batch_counts = (len(cluster_labels),)

    fitted = PopulationModel(MEASURE, model).fit(stats, cohort, cohorts, None, groups)
    posterior = fitted.message
    assert posterior.group_levels == ["cluster"] and posterior.groups == groups.labels
    num_draws = len(posterior.draws["mu"])
    assert np.shape(posterior.group_mean) == np.shape(posterior.group_var) == (num_draws, 4)
    assert np.shape(posterior.group_cross_cov) == (1, num_draws, len(cohorts), 4)
    assert {"effect_sd_cohorts", "effect_sd_cluster"} <= set(posterior.summary)

    # The fit saw the batch likelihood: the book's rows and labels against the
    # batch statistics' under a few of the posterior's draws (exact up to the
    # order of summation).
    draws = MeasurePosterior.from_message(posterior).draws
    row = {p: i for i, p in enumerate(book.patient_ids)}
    order = np.array([row[p] for p in patients])
    for s in range(3):
        theta = jax.tree.map(lambda a, s=s: None if a is None else a[s], draws)
        stream = collapsed_loglik(
            theta, jnp.asarray(stats.gram), jnp.asarray(cohort), len(cohorts), model.structure,
            None, jnp.asarray(groups.index), (len(groups.labels[0]),),
        )  # fmt: skip
        reference = collapsed_loglik(
            theta, jnp.asarray(batch.gram), jnp.asarray(batch_cohort), len(cohort_labels),
            model.structure, None, jnp.asarray(batch_cluster), batch_counts,
        )  # fmt: skip
        assert float(stream) == pytest.approx(float(reference), rel=1e-12)
    assert np.array_equal(stats.gram[order], batch.gram)

    # Every patient's score from the published groups' posterior equals the batch
    # scoring (model.scores.summarize_effects: the groups' joint posterior from
    # all evidence under the same draws). Means and sds are float64 throughout
    # (1e-9); interval ends and probabilities come from the float32 mixture CDF
    # (model.scores.MIXTURE_DTYPE), whose inputs differ here by float64 rounding
    # only: within 1e-5 (a few float32 ulps of a probability, of an end in sds).
    posteriors = PosteriorBook()
    posteriors.offer(posterior)
    context = StepContext(catalogue, models, posteriors, SETTINGS)
    _, out = rescore(states, MEASURE, context, force=True)
    scores = {m.key.decode(): json.loads(m.value)["measures"][0] for m in out.scores}
    assert set(scores) == set(patients)
    reference = summarize_effects(
        draws, batch.gram, batch_cohort, len(cohort_labels), catalogue.get(MEASURE).measure_config(),
        model, groups=batch_cluster, num_groups=batch_counts,
    )  # fmt: skip
    sd = reference.sd
    for field, expected, tolerance in (
        ("mean", reference.mean, 1e-9 * sd),
        ("sd", sd, 1e-9 * sd),
        ("lower", reference.lower, 1e-5 * sd),
        ("upper", reference.upper, 1e-5 * sd),
    ):
        got = np.array([scores[p]["effect"][field] for p in patients])
        np.testing.assert_array_less(np.abs(got - expected), tolerance + 1e-12, err_msg=field)
    for field in ("p_benefit_ge_mcid", "p_benefit_gt_0"):
        got = np.array([scores[p][field] for p in patients])
        np.testing.assert_allclose(got, getattr(reference, field), rtol=0, atol=1e-5)
    cohort_part = np.array([scores[p]["cohort_deviation"] for p in patients])
    np.testing.assert_allclose(cohort_part, reference.cohort_deviation, rtol=1e-9, atol=1e-12)

    # A patient of a cluster the fit has not seen, or of no cluster, is scored
    # (its group at the prior, or the missing-attribute group).
    measure_posterior = MeasurePosterior.from_message(posterior)
    record = saved[patients[0]]
    unseen_mean, unseen_var = measure_posterior.cohort_posterior(
        [record.cohort, record.cohort], [{"cluster": "west"}, {}]
    )
    g = measure_posterior.cohort_index[record.cohort]
    missing = measure_posterior.group_index[1][MISSING_GROUP]
    tau = np.asarray(draws.tau_groups)[:, 0]
    np.testing.assert_allclose(unseen_mean[:, 0], measure_posterior.cohort_mean[:, g], rtol=1e-12)
    np.testing.assert_allclose(
        unseen_var[:, 0], measure_posterior.cohort_var[:, g] + tau**2, rtol=1e-12
    )
    parts = measure_posterior.groups
    np.testing.assert_allclose(
        unseen_var[:, 1],
        parts.var[0][:, g] + parts.var[1][:, missing] + 2 * parts.cross[0][:, g, missing],
        rtol=1e-12,
    )

    # The predictive check uses the same shift moments: every reading's residual,
    # the programme replayed under the posterior, N(0, 1) while it describes the data.
    pending = []
    replayed: dict[str, bytes] = {}
    for start in range(0, len(records), 500):
        chunk = records[start : start + 500]
        saves, out = process_batch({k: replayed.get(k) for k in batch_keys(chunk)}, chunk, context)
        replayed.update(saves)
        pending += out.readings[MEASURE]
    residuals = reading_residuals(posteriors[MEASURE], pending, model)
    assert residuals.shape == (len(pending),) and np.all(np.isfinite(residuals))
    assert abs(residuals.mean()) < 0.15 and 0.8 < residuals.std() < 1.25, residuals.std()

    # A declared subgroup (the first clinic) under the levels: the population
    # agent's subgroup step against the batch summary under the same draws.
    snapshot = BookSnapshot(stats.gram, cohort, cohorts, None, groups)
    _, out = subgroup_step({}, posterior, snapshot, catalogue, model, DecisionRule())
    (score,) = out.scores
    members = (batch_cohort == cohort_labels.index("clinic-00")).astype(float)[None]
    whole = summarize_subgroups(
        draws, batch.gram, batch_cohort, len(cohort_labels), members,
        catalogue.get(MEASURE).measure_config(), model, groups=batch_cluster,
        num_groups=batch_counts, level=0.9,
    )  # fmt: skip
    assert score.members == int(members.sum())
    assert score.effect.mean == pytest.approx(float(whole.mean[0]), rel=1e-9)
    assert score.effect.sd == pytest.approx(float(whole.sd[0]), rel=1e-9)

    # The population agent's structure selection compares the levels: each one
    # as the only level, and both (the clusters have no effect of their own here).
    selection = StructureSelectionRun(
        MEASURE, model, (stats, cohort, cohorts), num_folds=3, groups=groups
    ).run()
    compared = {row.structure for row in selection.structures}
    assert {"partial+cohort", "partial+cluster", "partial+cohort+cluster"} <= compared
    assert selection.current_structure == "partial+cohort+cluster"
    assert selection.skipped_attributes == []
