"""Joint groups in the stream without Kafka (streams.joint_stream): the
catalogue's ``[joint.<group>]`` validation, the group's model, its evidence
gathered from the measures' books, the fit's posterior record and a patient's
joint score under it."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from datetime import timedelta
from pathlib import Path

import jax
import numpy as np
import numpyro.distributions as dist
import pytest

from model.config import DecisionRule
from model.events import Events
from model.evidence import events_stats
from model.joint import JointHyper, cohort_posteriors, joint_grams, joint_patients
from model.scores import classify
from model.simulate import simulate_joint
from streams.app import measure_models
from streams.catalogue import Catalogue, CatalogueError
from streams.chunked_consumer import ChunkRecord
from streams.joint_stream import (
    JointModel,
    PosteriorTooLarge,
    fit_to_size,
    joint_models,
    joint_scores,
    joint_snapshot,
    posterior_draws,
    thin_draws,
)
from streams.partitioning import key_partition
from streams.patient_state import PatientRecord
from streams.patient_step import StepContext, batch_keys, process_batch, rescore_joint
from streams.population_book import FitterPool, PopulationBook
from streams.posterior_feed import PosteriorBook
from streams.schemas import (
    EfficacyScore,
    Enrollment,
    ExposureChange,
    JointPosterior,
    LabResult,
    PatientEvidence,
)
from streams.settings import Settings

SHIPPED = Path(__file__).parent.parent / "streams" / "measures.toml"
GROUP = '\n[joint.glycaemic]\nmeasures = ["hba1c", "fasting_glucose"]\n'
SETTINGS = Settings(max_age_days=36500.0)


def catalogue(tmp_path: Path, extra: str = GROUP) -> Catalogue:
    path = tmp_path / "measures.toml"
    path.write_text(SHIPPED.read_text() + extra)
    return Catalogue.load(path)


def test_a_joint_group_loads_with_its_measures(tmp_path):
    loaded = catalogue(tmp_path)
    assert [(g.name, g.measures) for g in loaded.joint] == [
        ("glycaemic", ("hba1c", "fasting_glucose"))
    ]
    assert loaded.joint_group_of("fasting_glucose").name == "glycaemic"
    assert loaded.joint_group_of("phq9") is None


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ('[joint.g]\nmeasures = ["hba1c"]\n', "at least 2"),
        ('[joint.g]\nmeasures = ["hba1c", "hba1c"]\n', "repeat"),
        ('[joint.g]\nmeasures = ["hba1c", "glucose"]\n', "unknown measure 'glucose'"),
        (
            '[joint.g]\nmeasures = ["hba1c", "phq9"]\n[joint.h]\nmeasures = ["phq9", "daily_steps"]\n',
            "phq9 is in joint groups g and h",
        ),
        (
            '[joint.g]\nmeasures = ["hba1c", "phq9", "daily_steps", "sleep_minutes", '
            '"systolic_bp", "ldl_cholesterol", "fasting_glucose"]\n',
            "at most 6",
        ),
        (
            '[symptom]\nunit = "yes/no"\ndirection = "lower"\nfamily = "bernoulli"\nmcid = 1.5\n'
            "plausible = [0.0, 1.0]\ntypical = [0.0, 1.0]\n"
            '[joint.g]\nmeasures = ["hba1c", "symptom"]\n',
            "symptom is a bernoulli measure",
        ),
        ("[joint.g]\nmeasures = 3\n", r"\[joint.g\]"),
    ],
)
def test_invalid_joint_groups_are_refused_with_a_clear_error(tmp_path, extra, message):
    with pytest.raises(CatalogueError, match=message):
        catalogue(tmp_path, "\n" + extra)


def test_the_group_model_takes_each_measure_streaming_config_with_its_cohort_level(tmp_path):
    loaded = catalogue(tmp_path)
    models = measure_models(loaded, SETTINGS)
    config = joint_models(loaded, models)["glycaemic"]
    assert config.cohort_level  # the shipped measures stream with a cohort level
    for measure, name in zip(config.measures, ["hba1c", "fasting_glucose"], strict=True):
        assert measure.standardization == models[name].standardization
        assert measure.time_trend == models[name].time_trend
        assert measure.cohort_level == models[name].cohort_level
        assert measure.recent_half_life is None


def test_a_group_whose_measures_forget_or_have_covariates_is_refused(tmp_path):
    loaded = catalogue(tmp_path)
    forgetting = measure_models(loaded, Settings(max_age_days=36500.0, half_life_days=30.0))
    with pytest.raises(CatalogueError, match=r"glycaemic: hba1c.*half-life"):
        joint_models(loaded, forgetting)
    with_covariates = catalogue(
        tmp_path,
        GROUP + '[covariates.age]\nkind = "numeric"\nunit = "years"\n'
        "plausible = [0.0, 120.0]\ntypical = [50.0, 15.0]\n",
    )
    with pytest.raises(CatalogueError, match="patient covariates"):
        joint_models(with_covariates, measure_models(with_covariates, SETTINGS))


# --- evidence and scores ------------------------------------------------------

#: Readings of (hba1c, fasting_glucose) per patient: some patients lack one measure.
READINGS = np.array([[6, 8], [0, 5], [4, 0], [3, 3], [7, 2], [0, 6], [5, 5], [2, 9]])


def programme(seed: int = 3, readings: np.ndarray = READINGS) -> list[Events]:
    """Raw events of hba1c (%) and fasting glucose (mg/dL), times in stream days."""
    events, _truth = simulate_joint(
        readings,
        effect_mean=np.array([-0.6, -15.0]),
        effect_sd=np.array([0.4, 10.0]),
        effect_correlation=0.6,
        intercept_mean=np.array([7.5, 130.0]),
        intercept_sd=np.array([1.0, 25.0]),
        residual_sd=np.array([0.4, 12.0]),
        seed=seed,
    )
    origin = SETTINGS.time_origin.timestamp() / 86400.0
    return [dataclasses.replace(each, time=each.time + origin + 10.0) for each in events]


def books_of(events: list[Events], models, names, order) -> list[PopulationBook]:
    """Each measure's book filled as the population agent fills it: one
    PatientEvidence per patient with readings, patients put in ``order``."""
    books = []
    for each, name in zip(events, names, strict=True):
        book = PopulationBook(name, models[name])
        stats = events_stats(each, models[name])
        for i in order:
            readings = int(np.sum(each.patient == i))
            if readings == 0:
                continue
            book.put(
                PatientEvidence(
                    measure=name,
                    patient_id=f"p{i}",
                    cohort="c1" if i % 2 else "c0",
                    gram=stats.gram[i].tolist(),
                    reference_time=float(stats.reference_time[i]),
                    count_exposed=readings,
                    count_unexposed=0,
                )
            )
        books.append(book)
    return books


def test_the_joint_snapshot_stacks_each_measure_book_as_joint_grams(tmp_path):
    loaded = catalogue(tmp_path)
    models = measure_models(loaded, SETTINGS)
    config = joint_models(loaded, models)["glycaemic"]
    events = programme()
    names = ["hba1c", "fasting_glucose"]
    count = READINGS.shape[0]
    # The books meet patients in different orders: rows are matched by id.
    books = [
        books_of(events, models, names, list(range(count)))[0],
        books_of(events, models, names, list(range(count))[::-1])[1],
    ]
    snapshot = joint_snapshot(books, config)
    expected = joint_grams(events, config)
    rows = [int(patient_id[1:]) for patient_id in snapshot.patient_ids]
    assert sorted(rows) == list(range(count))
    np.testing.assert_allclose(snapshot.gram, expected[rows], rtol=1e-12, atol=1e-12)
    assert [snapshot.cohorts[c] for c in snapshot.cohort] == ["c1" if i % 2 else "c0" for i in rows]
    # A measure without a book yet: zero blocks.
    alone = joint_snapshot([books[0], None], config)
    assert np.all(alone.gram[:, 1] == 0.0)


def random_draws(config, count: int = 24, seed: int = 0) -> JointHyper:
    """Plausible draws of θ (standardised units), not from any fit."""
    key = jax.random.split(jax.random.PRNGKey(seed), 5)
    m, dim = config.num_measures, config.block_dim
    return JointHyper(
        mu=0.3 * jax.random.normal(key[0], (count, m, 2)),
        tau=0.2 + 0.5 * jax.random.uniform(key[1], (count, dim)),
        corr_chol=dist.LKJCholesky(dim, 2.0).sample(key[2], (count,)),
        sigma=0.3 + 0.3 * jax.random.uniform(key[3], (count, m)),
        gamma=0.05 * jax.random.normal(key[4], (count, m, config.fixed_dim)),
        tau_cohort=jax.numpy.zeros((count, m)),  # as joint_from_sites without a cohort level
    )


def joint_message(config, draws: JointHyper, gram: np.ndarray, version: int) -> JointPosterior:
    """A JointPosterior of ``draws`` as a consumer reads it (through JSON)."""
    message = JointPosterior(
        event_id=f"posterior:joint:glycaemic:{version}",
        event_time=SETTINGS.time_origin,
        group="glycaemic",
        version=version,
        measures=["hba1c", "fasting_glucose"],
        num_patients=gram.shape[0],
        num_observations=gram[:, :, 0, 0].sum(axis=0).tolist(),
        elbo=0.0,
        svi_steps=0,
        converged=True,
        standardization=[m.standardization.model_dump() for m in config.measures],
        draws={f: np.asarray(getattr(draws, f)).tolist() for f in JointHyper._fields},
        effect_correlation={},
        summary={},
        unconstrained_loc=[],
        unconstrained_scale_tril=[],
    )
    return JointPosterior.model_validate_json(message.model_dump_json())


def test_joint_scores_equal_joint_patients_on_the_same_draws_and_grams(tmp_path):
    loaded = catalogue(tmp_path)
    models = measure_models(loaded, SETTINGS)
    config = joint_models(loaded, models)["glycaemic"]
    specs = [loaded.get("hba1c"), loaded.get("fasting_glucose")]
    gram = joint_grams(programme(), config)
    draws = random_draws(config)
    message = joint_message(config, draws, gram, 4)
    scores = joint_scores(message, config, specs, gram)
    # Both measures are "lower is better": benefit signs −1.
    reference = joint_patients(draws, gram, config, np.array([-1.0, -1.0]))
    scales = np.array([1.2, 30.0])  # the catalogue's typical spreads (outcome scale)
    assert len(scores) == gram.shape[0]
    for i, score in enumerate(scores):
        assert score.group == "glycaemic" and score.population_version == 4
        for m, effect in enumerate(score.effects):
            assert effect.measure == specs[m].name and effect.unit == specs[m].unit
            got = [effect.effect.mean, effect.effect.sd, effect.effect.lower, effect.effect.upper]
            want = scales[m] * np.array(
                [
                    reference.effect_mean[i, m],
                    reference.effect_sd[i, m],
                    reference.effect_lower[i, m],
                    reference.effect_upper[i, m],
                ]
            )
            np.testing.assert_allclose(got, want, rtol=1e-9)
        rho = score.responsiveness
        np.testing.assert_allclose(
            [rho.mean, rho.sd, rho.lower, rho.upper, score.p_above_population],
            [
                reference.responsiveness_mean[i],
                reference.responsiveness_sd[i],
                reference.responsiveness_lower[i],
                reference.responsiveness_upper[i],
                reference.p_above_population[i],
            ],
            rtol=1e-9,
        )
    # More patients than a scoring block (256): scored block by block, the same.
    many = joint_scores(message, config, specs, np.concatenate([gram] * 33))
    assert len(many) == 33 * gram.shape[0]
    assert many[-1] == scores[-1] and many[256] == scores[256 % gram.shape[0]]


def test_the_group_fit_publishes_theta_the_correlation_and_population_effects(tmp_path):
    """A fit on a simulated programme (60 patients, effects correlated 0.6):
    the posterior record carries what scoring needs, and the population effects
    in raw units cover the simulation's truth within their posterior sd."""
    loaded = catalogue(tmp_path)
    models = measure_models(loaded, SETTINGS)
    config = joint_models(loaded, models)["glycaemic"]
    rng = np.random.default_rng(1)
    readings = rng.integers(3, 9, size=(60, 2))
    events = programme(seed=5, readings=readings)
    names = ["hba1c", "fasting_glucose"]
    books = books_of(events, models, names, list(range(60)))
    model = JointModel("glycaemic", names, config, FitterPool())
    result = model.fit(joint_snapshot(books, config))
    message = JointPosterior.model_validate_json(result.message.model_dump_json())
    assert message.kind == "joint" and message.version == 1 and message.num_patients == 60
    assert message.num_observations == pytest.approx(readings.sum(axis=0).tolist())
    assert np.asarray(message.draws["corr_chol"]).shape[1:] == (4, 4)
    assert np.asarray(message.effect_correlation["mean"]).shape == (2, 2)
    loadings = message.effect_factor["loadings"]
    assert (
        len(loadings["mean"]) == 2 and 0.5 <= message.effect_factor["variance_share"]["mean"] <= 1
    )
    assert all(
        lo <= mean <= hi
        for lo, mean, hi in zip(loadings["q05"], loadings["mean"], loadings["q95"], strict=True)
    )
    assert message.cohorts == ["c0", "c1"] or message.cohorts == ["c1", "c0"]
    draws_count = np.asarray(message.draws["tau_cohort"]).shape[0]
    assert np.asarray(message.cohort_mean).shape == (draws_count, 2, 2)
    assert np.asarray(message.cohort_cov).shape == (draws_count, 2, 2, 2)
    for name, truth in zip(names, [-0.6, -15.0], strict=True):
        effect = message.summary[f"effect_{name}"]
        assert abs(effect.mean - truth) < 3.0 * effect.sd + 0.1 * abs(truth), (name, effect)
    # The next fit continues warm: version 2.
    assert model.fit(joint_snapshot(books, config)).message.version == 2


def test_joint_scores_mix_over_the_posteriors_cohort_shifts(tmp_path):
    """With a cohort level the posterior carries each draw's u_g posterior from
    all evidence: scores of any subset of patients equal joint_patients over
    all of them (the cohort posteriors computed there from the same grams); a
    patient of a cohort the posterior does not know gets u_g's prior."""
    loaded = catalogue(tmp_path)
    models = measure_models(loaded, SETTINGS)
    config = joint_models(loaded, models)["glycaemic"]
    specs = [loaded.get("hba1c"), loaded.get("fasting_glucose")]
    gram = joint_grams(programme(), config)
    count = gram.shape[0]
    labels = ["c1" if i % 2 else "c0" for i in range(count)]
    index = np.array([i % 2 for i in range(count)], dtype=np.int32)
    draws = random_draws(config)._replace(
        tau_cohort=0.3 + 0.4 * jax.random.uniform(jax.random.PRNGKey(9), (24, 2))
    )
    means, covs = cohort_posteriors(draws, gram, index, 2, config.structure)
    message = joint_message(config, draws, gram, 4).model_copy(
        update={
            "cohorts": ["c0", "c1"],
            "cohort_mean": np.asarray(means).tolist(),
            "cohort_cov": np.asarray(covs).tolist(),
        }
    )
    message = JointPosterior.model_validate_json(message.model_dump_json())
    signs = np.array([-1.0, -1.0])
    reference = joint_patients(draws, gram, config, signs, cohort=index, num_cohorts=2)
    some = [1, 2, 5]
    scores = joint_scores(message, config, specs, gram[some], cohorts=[labels[i] for i in some])
    scales = np.array([1.2, 30.0])
    for row, i in enumerate(some):
        for m, effect in enumerate(scores[row].effects):
            got = [effect.effect.mean, effect.effect.sd, effect.effect.lower, effect.effect.upper]
            want = scales[m] * np.array(
                [
                    reference.effect_mean[i, m],
                    reference.effect_sd[i, m],
                    reference.effect_lower[i, m],
                    reference.effect_upper[i, m],
                ]
            )
            np.testing.assert_allclose(got, want, rtol=1e-9)
        np.testing.assert_allclose(
            scores[row].p_above_population, reference.p_above_population[i], rtol=1e-9
        )
    # An unknown cohort (or none): u_g's prior N(0, diag(τ_u²)) under each draw.
    tau = np.asarray(draws.tau_cohort)
    prior = (np.zeros((24, 1, 2)), tau[:, None, :, None] * np.eye(2) * tau[:, None, None, :])
    alone = joint_patients(
        draws, gram[:1], config, signs, cohort=np.zeros(1, np.int32), cohort_moments=prior
    )
    for label in ("elsewhere", None):
        unseen = joint_scores(message, config, specs, gram[:1], cohorts=[label])[0]
        np.testing.assert_allclose(
            unseen.effects[0].effect.sd, scales[0] * alone.effect_sd[0, 0], rtol=1e-9
        )
        assert unseen.effects[0].effect.sd > scores_sd_known(message, config, specs, gram, labels)


def scores_sd_known(message, config, specs, gram, labels) -> float:
    """Patient 0's hba1c effect sd in its own (known) cohort."""
    return (
        joint_scores(message, config, specs, gram[:1], cohorts=labels[:1])[0].effects[0].effect.sd
    )


# --- the programme of the stream steps and the end-to-end test -------------------

MEASURES = ("hba1c", "fasting_glucose")
UNITS = ("%", "mg/dL")
PATIENTS = 24


def stream_programme(origin):
    """The end-to-end programme (tests/test_joint_e2e.py): readings per patient of both measures (a few patients lack one), the
    simulated events with stream times (days since the epoch: unexposed readings
    in days 0-15 of the programme, exposed in days 15-30) and the patient ids."""
    rng = np.random.default_rng(11)
    readings = rng.integers(4, 9, size=(PATIENTS, 2))
    readings[[3, 10], 0] = 0
    readings[[7], 1] = 0
    events, _truth = simulate_joint(
        readings,
        effect_mean=np.array([-0.6, -15.0]),
        effect_sd=np.array([0.4, 10.0]),
        effect_correlation=0.6,
        intercept_mean=np.array([7.5, 130.0]),
        intercept_sd=np.array([1.0, 25.0]),
        residual_sd=np.array([0.4, 12.0]),
        seed=4,
    )
    start = origin.timestamp() / 86400.0
    timed = []
    for each in events:
        u = rng.uniform(0.0, 15.0, each.patient.size)
        timed.append(dataclasses.replace(each, time=start + u + 15.0 * (each.exposure > 0)))
    return timed, [f"joint-{i:02d}" for i in range(PATIENTS)]


def raw_records(events, patients, origin, prefix, measures=MEASURES):
    """The programme's raw records: each patient's enrolment and exposure change,
    then the readings in time order (the k-th events' measure ``measures[k]``)."""
    sends = []
    for patient in patients:
        enrol = Enrollment(event_id=f"{patient}-enrol", event_time=origin, patient_id=patient,
                           cohort="clinic-0", exposed=False)  # fmt: skip
        change = ExposureChange(event_id=f"{patient}-start", patient_id=patient, exposure=1.0,
                                event_time=origin + timedelta(days=15.0))  # fmt: skip
        for message in (enrol, change):
            sends.append((prefix + "enrollments", patient.encode(), message.model_dump_json()))
    readings = []
    for m, each in enumerate(events):
        for k in range(each.patient.size):
            patient = patients[each.patient[k]]
            lab = LabResult(
                event_id=f"{patient}-{measures[m]}-{k}", patient_id=patient,
                event_time=origin + timedelta(days=float(each.time[k]) - origin.timestamp() / 86400.0),
                measure=measures[m], value=float(each.outcome[k]), unit=UNITS[m],
            )  # fmt: skip
            readings.append(
                (each.time[k], (prefix + "labs", patient.encode(), lab.model_dump_json()))
            )
    readings.sort(key=lambda pair: pair[0])
    sends += [record for _, record in readings]
    return [(topic, key, value.encode()) for topic, key, value in sends]


def test_the_patient_step_publishes_each_patient_joint_score_as_joint_patients(tmp_path):
    """Raw records -> process_batch under a joint posterior: every patient's
    score carries the group's joint score, equal to model.joint.joint_patients
    on the posterior's draws and joint_grams of the simulated events (the same
    numbers summed in another order: 1e-9 relative). A newer joint posterior
    rescores every patient (rescore_joint) under its version."""
    loaded = catalogue(tmp_path)
    models = measure_models(loaded, SETTINGS)
    config = joint_models(loaded, models)["glycaemic"]
    origin = SETTINGS.time_origin
    events, patients = stream_programme(origin)
    raw = [
        ChunkRecord(key, value, topic, key_partition(key, SETTINGS.partitions), k, None)
        for k, (topic, key, value) in enumerate(raw_records(events, patients, origin,
                                                            SETTINGS.topic_prefix))
    ]  # fmt: skip
    gram = joint_grams(events, config)
    draws = random_draws(config, seed=2)
    posteriors = PosteriorBook()
    assert posteriors.offer(joint_message(config, draws, gram, 3))
    context = StepContext(loaded, models, posteriors, SETTINGS, joint={"glycaemic": config})
    now = origin + timedelta(days=60)
    saves, outputs = process_batch(dict.fromkeys(batch_keys(raw)), raw, context, now=now)
    assert not outputs.dead_letters
    latest = {m.key.decode(): json.loads(m.value) for m in outputs.scores}
    assert sorted(latest) == patients
    for m in outputs.scores:  # written without the model: its own serialisation, byte for byte
        assert EfficacyScore.model_validate_json(m.value).model_dump_json().encode() == m.value
    scales = np.array([1.2, 30.0])
    mcid = np.array([loaded.get("hba1c").mcid, loaded.get("fasting_glucose").mcid])
    reference = joint_patients(draws, gram, config, np.array([-1.0, -1.0]), mcid / scales)
    # Each effect's call: the measures' decision rule on the joint probabilities
    # and the readings each patient has of the measure, exposed and not.
    calls = [
        classify(
            reference.p_benefit_ge_mcid[:, m],
            reference.p_benefit_gt_0[:, m],
            np.bincount(each.patient[each.exposure != 0], minlength=len(patients)),
            np.bincount(each.patient[each.exposure == 0], minlength=len(patients)),
            DecisionRule(),
        )
        for m, each in enumerate(events)
    ]
    for i, patient in enumerate(patients):
        (joint,) = latest[patient]["joint"]
        assert joint["population_version"] == 3
        effects = joint["effects"]
        np.testing.assert_allclose(
            [[e["p_benefit_ge_mcid"], e["p_benefit_gt_0"]] for e in effects],
            np.stack([reference.p_benefit_ge_mcid[i], reference.p_benefit_gt_0[i]], -1),
            rtol=1e-9,
        )
        assert [e["classification"] for e in effects] == [calls[0][i], calls[1][i]]
        published = PatientRecord.model_validate_json(saves[patient]).published_joint
        assert published["glycaemic"].calls == {
            "hba1c": calls[0][i],
            "fasting_glucose": calls[1][i],
        }
        got = [[e["effect"][f] for f in ("mean", "sd", "lower", "upper")] for e in joint["effects"]]
        want = scales[:, None] * np.stack(
            [reference.effect_mean[i], reference.effect_sd[i],
             reference.effect_lower[i], reference.effect_upper[i]], -1,
        )  # fmt: skip
        np.testing.assert_allclose(got, want, rtol=1e-9)
        np.testing.assert_allclose(
            [joint["responsiveness"]["mean"], joint["p_above_population"]],
            [reference.responsiveness_mean[i], reference.p_above_population[i]],
            rtol=1e-9,
        )
    assert posteriors.offer(joint_message(config, random_draws(config, seed=3), gram, 4))
    saves, outputs = rescore_joint(saves, "glycaemic", context, force=True)
    assert sorted(saves) == patients
    assert {json.loads(m.value)["joint"][0]["population_version"] for m in outputs.scores} == {4}


def test_an_oversized_posterior_is_thinned_evenly_to_fit_the_limit(tmp_path):
    """fit_to_size on a posterior with a cohort level (40 cohorts, 24 draws)
    against a limit of 40% of its size: the value is under the limit with the
    largest number of draws that fits, the draws kept are evenly spread, and the
    cohort tables kept are those of the kept draws of θ (recomputed from them by
    cohort_posteriors). Consumers score the thinned posterior as joint_patients
    does on the same draws. Under the limit, nothing changes; a limit that not
    even one draw fits is an error."""
    loaded = catalogue(tmp_path)
    models = measure_models(loaded, SETTINGS)
    config = joint_models(loaded, models)["glycaemic"]
    specs = [loaded.get("hba1c"), loaded.get("fasting_glucose")]
    gram = joint_grams(programme(), config)
    count, num_cohorts, num_draws = gram.shape[0], 40, 24
    index = np.arange(count, dtype=np.int32) % num_cohorts  # 8 patients: 32 cohorts empty
    draws = random_draws(config, num_draws)._replace(
        tau_cohort=0.3 + 0.4 * jax.random.uniform(jax.random.PRNGKey(9), (num_draws, 2))
    )
    means, covs = cohort_posteriors(draws, gram, index, num_cohorts, config.structure)
    full = joint_message(config, draws, gram, 4).model_copy(
        update={
            "cohorts": [f"c{g}" for g in range(num_cohorts)],
            "cohort_mean": np.asarray(means).tolist(),
            "cohort_cov": np.asarray(covs).tolist(),
        }
    )
    size = len(full.model_dump_json().encode())

    same = fit_to_size(full, size)
    assert (
        not same.thinned and same.message is full and same.value == full.model_dump_json().encode()
    )

    limit = int(0.4 * size)
    sized = fit_to_size(full, limit)
    assert sized.thinned and sized.original_bytes == size and sized.original_draws == num_draws
    assert len(sized.value) <= limit
    kept = sized.draws
    assert 1 <= kept < num_draws
    assert len(thin_draws(full, kept + 1).model_dump_json().encode()) > limit  # the largest
    message = JointPosterior.model_validate_json(sized.value)
    assert message == sized.message
    # Which draws were kept: each kept draw of θ is one of the original's, in order.
    original = np.asarray(full.draws["sigma"])
    thinned = np.asarray(message.draws["sigma"])
    picked = [int(np.flatnonzero(np.all(original == row, axis=1))[0]) for row in thinned]
    gaps = np.diff(picked)
    assert np.all(gaps > 0) and gaps.max() - gaps.min() <= 1  # evenly spread
    assert picked[0] == 0 and num_draws - 1 - picked[-1] < gaps.max()  # over all the draws
    for field in JointHyper._fields:
        np.testing.assert_array_equal(
            np.asarray(message.draws[field]), np.asarray(full.draws[field])[picked]
        )
    # The cohort tables are those of the kept draws: recomputed from them.
    kept_draws = posterior_draws(message)
    kept_means, kept_covs = cohort_posteriors(
        kept_draws, gram, index, num_cohorts, config.structure
    )
    np.testing.assert_allclose(message.cohort_mean, np.asarray(kept_means), rtol=1e-12)
    np.testing.assert_allclose(message.cohort_cov, np.asarray(kept_covs), rtol=1e-12)
    # What is not per draw is kept.
    assert message.cohorts == full.cohorts and message.standardization == full.standardization

    # Consumers take the fewer draws: the scores are joint_patients' on them.
    labels = [f"c{g}" for g in index]
    scores = joint_scores(message, config, specs, gram, cohorts=labels)
    reference = joint_patients(
        kept_draws, gram, config, np.array([-1.0, -1.0]), cohort=index, num_cohorts=num_cohorts
    )
    for i, score in enumerate(scores):
        np.testing.assert_allclose(
            score.effects[0].effect.mean, 1.2 * reference.effect_mean[i, 0], rtol=1e-9
        )
        np.testing.assert_allclose(
            score.p_above_population, reference.p_above_population[i], rtol=1e-9
        )

    one = len(thin_draws(full, 1).model_dump_json().encode())
    with pytest.raises(PosteriorTooLarge, match="with one draw"):
        fit_to_size(full, one - 1)


class SentTopic:
    """Stands for the posterior topic: keeps what is sent."""

    def __init__(self) -> None:
        self.sent: list[tuple[bytes, bytes]] = []

    async def send(self, *, key: bytes, value: bytes) -> None:
        self.sent.append((key, value))


def test_the_population_agent_thins_a_joint_posterior_over_the_limit(tmp_path, monkeypatch, caplog):
    """The agent's joint update with the message limit lowered below its
    posterior: it publishes the posterior thinned to fit, logs a warning naming
    the group (no patient), and counts it in the group's metric."""
    from types import SimpleNamespace

    import faust
    from prometheus_client import CollectorRegistry

    from model.config import SVIConfig
    from monitoring.metrics import create_metrics
    from streams.agents import population as population_agent
    from streams.telemetry import Telemetry

    loaded = catalogue(tmp_path)
    models = measure_models(loaded, SETTINGS)
    names = ["hba1c", "fasting_glucose"]
    topic = SentTopic()
    registry = CollectorRegistry()
    service = population_agent.PopulationService(
        faust.App("joint-size-test", broker="kafka://127.0.0.1:9", web_enabled=False),
        SimpleNamespace(population_posterior=topic),  # type: ignore[arg-type]
        models,
        PosteriorBook(),
        SETTINGS.model_copy(update={"population_min_patients": 2}),
        Telemetry(create_metrics(registry)),
        svi=SVIConfig(fresh_steps=50, update_steps=50, num_particles=1),
        catalogue=loaded,
    )
    for book in books_of(programme(), models, names, list(range(READINGS.shape[0]))):
        service.books[book.measure] = book
    service._owned.update(names)
    service.owns = lambda measure: True  # type: ignore[method-assign]
    limit = 60_000
    monkeypatch.setattr(population_agent, "POSTERIOR_VALUE_LIMIT", limit)
    with caplog.at_level("WARNING", logger=population_agent.__name__):
        published = asyncio.run(service.fit_joint("glycaemic"))
    [(key, value)] = topic.sent
    assert key == b"joint:glycaemic" and len(value) <= limit
    message = JointPosterior.model_validate_json(value)
    assert message == published
    kept = len(message.draws["mu"])
    assert 1 <= kept < 400 and np.asarray(message.cohort_mean).shape[0] == kept
    [warning] = [r for r in caplog.records if r.levelname == "WARNING"]
    text = warning.getMessage()
    assert "joint glycaemic v1" in text and f"with {kept} of its 400 draws" in text
    assert not any(f"p{i}" in text.split() for i in range(READINGS.shape[0]))
    thinned = registry.get_sample_value(
        "efficacy_joint_posteriors_thinned_total", {"group": "glycaemic"}
    )
    assert thinned == 1.0
