"""Operating characteristics (model.operating, `efficacy oc`)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cli.main import main
from model.config import Standardization
from model.operating import rate_with_se, replicate_counts, standardization_for
from model.scores import Classification
from model.simulate import ProgrammeSpec, simulate


def test_rate_and_cluster_se_by_hand():
    # replicates with 3/10 and 5/10: p = 0.4, residuals h − p m = (−1, 1),
    # se² = 2 / (2 · 1 · 10²) = 0.01
    rate, se, n = rate_with_se(np.array([3, 5]), np.array([10, 10]))
    assert (rate, n) == (0.4, 20) and se == pytest.approx(0.1)
    rate, se, n = rate_with_se(np.array([3]), np.array([10]))  # one replicate: binomial
    assert se == pytest.approx(np.sqrt(0.3 * 0.7 / 10))
    rate, se, n = rate_with_se(np.array([0, 0]), np.array([0, 0]))
    assert np.isnan(rate) and n == 0


def test_replicate_counts_use_the_true_benefit_groups():
    benefit = np.array([5.0, 3.0, 1.0, 0.0, -2.0])  # MCID 3: responders 0, 1; non 3, 4
    R, N, U = (c.value for c in (Classification.RESPONDER, Classification.NON_RESPONDER,
                                 Classification.UNCERTAIN))  # fmt: skip
    calls = np.array([R, N, R, R, N])
    counts = replicate_counts(benefit, calls, mcid=3.0)
    assert counts["responder_called_responder"] == (1, 2)
    assert counts["false_nonresponder"] == (1, 2)
    assert counts["nonresponder_called_nonresponder"] == (1, 2)
    assert counts["false_responder"] == (1, 2)
    assert counts["insufficient_data"] == (0, 5)
    assert U not in calls


def test_spec_standardization_is_close_to_the_data_one():
    """The data-free standardisation must put the data near mean 0, sd 1, or the
    weakly informative priors would mean something else: within 10 % of sd and
    0.1 sd in location on a large simulated programme."""
    spec = ProgrammeSpec(num_patients=2000, obs_per_patient=20, baseline_fraction=0.5)
    events = simulate(spec, 0).events
    data = Standardization.from_data(events.outcome, events.exposure, events.time)
    mine = standardization_for(spec)
    assert mine.outcome_scale == pytest.approx(data.outcome_scale, rel=0.1)
    assert abs(mine.outcome_location - data.outcome_location) < 0.1 * data.outcome_scale
    assert mine.time_scale == pytest.approx(data.time_scale, rel=0.1)
    assert abs(mine.time_location - data.time_location) < 0.1 * data.time_scale


def test_spec_standardization_with_covariates_is_close_to_the_data_one():
    """With patient covariates (age, a group of three levels that modifies the
    effect) the data-free map centres and scales them as the data do, and the
    outcome within the same 10 % / 0.1 sd."""
    spec = ProgrammeSpec(
        num_patients=3000, obs_per_patient=20, baseline_fraction=0.5, with_covariates=True,
        effect=0.0, group_effects=(-5.0, -10.0), effect_per_year=0.1,
    )  # fmt: skip
    events = simulate(spec, 0).events
    data = Standardization.from_data(events.outcome, events.exposure, events.time)
    data = data.with_covariates(events.covariates, None)
    mine = standardization_for(spec)
    assert mine.outcome_scale == pytest.approx(data.outcome_scale, rel=0.1)
    assert abs(mine.outcome_location - data.outcome_location) < 0.1 * data.outcome_scale
    np.testing.assert_allclose(mine.covariate_location, data.covariate_location, rtol=0.1)
    np.testing.assert_allclose(mine.covariate_scale, data.covariate_scale, rtol=0.1)
    assert standardization_for(spec.model_copy(update={"with_covariates": False})) == (
        standardization_for(spec.model_copy(update={"with_covariates": False, "group_effects": ()}))
    )  # without covariates in the model the group modifiers are not its business


def test_efficacy_oc_subgroups_small_run(tmp_path, capsys):
    """``efficacy oc --subgroups``: the output's structure, and every rate a
    proportion with its binomial se. How often a call is right or wrong is the
    benchmark's (benchmarks/README.md), not this test's: 2 programmes say nothing."""
    out = tmp_path / "oc"
    code = main(
        [
            "oc", "--subgroups", "--obs", "8", "--replicates", "2", "--patients", "40",
            "--cohorts", "2", "--mcid", "2", "--group-effect", "-5", "--svi-steps", "200",
            "--out-dir", str(out),
        ]
    )  # fmt: skip
    assert code == 0
    assert 'false "works"' in capsys.readouterr().out
    result = json.loads((out / "oc_subgroups.json").read_text())
    assert "| 8 | 1 | -5 |" in (out / "oc_subgroups.md").read_text()
    assert result["kind"] == "subgroups" and result["replicates"] == 2
    assert result["truth"]["effect"] == 0.0 and result["truth"]["group_effects"] == [-5.0]
    (row,) = result["rows"]
    assert row["obs_per_patient"] == 8
    assert [level["design_effect"] for level in row["levels"]] == [0.0, -5.0]

    def proportion(value, n):
        assert value["n"] == n and 0 <= value["hits"] <= n
        assert value["rate"] == pytest.approx(value["hits"] / n)
        assert value["se"] == pytest.approx(np.sqrt(value["rate"] * (1 - value["rate"]) / n))

    for level in row["levels"]:
        assert len(level["per_replicate"]) == 2
        assert set(level["per_replicate"]) <= {"works", "does_not_work", "uncertain",
                                               "insufficient_data"}  # fmt: skip
        for call in ("works", "does_not_work", "uncertain", "insufficient_data"):
            proportion(level[call], 2)
            assert level[call]["hits"] == level["per_replicate"].count(call)
        proportion(level["interval_covers_true_mean"], 2)
    # group 0 has no benefit by design, group 1 (lower is better) 2.5 MCID
    assert row["false_works"]["hits"] == row["levels"][0]["works"]["hits"]
    assert row["power"]["hits"] == row["levels"][1]["works"]["hits"]
    assert row["false_does_not_work"]["hits"] == row["levels"][1]["does_not_work"]["hits"]
    for name in ("false_works", "power", "false_does_not_work"):
        proportion(row[name], 2)


def test_efficacy_oc_group_effect_needs_subgroups(capsys):
    assert main(["oc", "--group-effect", "-5"]) == 2
    assert "--group-effect needs --subgroups" in capsys.readouterr().err


def test_efficacy_oc_small_run(tmp_path, capsys):
    """Strong effects for true responders: between-patient sd 6 around a population
    benefit equal to the MCID (3), so true responders' benefits average ≈ 3 + 6·0.8
    ≈ 8 while pooling alone never makes a call (P(benefit ≥ MCID) ≈ 0.5 at the
    population mean). With 6 observations (3 + 3, residual sd 4) a patient's effect
    has sd ≈ 3.3 and only the largest benefits reach P ≥ 0.8; with 40 the sd is
    ≈ 1.3 and most do. Replicate r has the same true effects in both rows, so the
    increase is checked in every replicate and pooled (> 2 se, and ≥ 0.15; a pilot
    run of 3 replicates gave 0.44 → 0.76). A true responder is called a
    non-responder only if P(benefit > 0) ≤ 0.2, several sds off: rate ≤ 0.05.

    Why not a population benefit well above the MCID: then, in small programmes
    with 6 observations, an underestimated between-patient sd pools everyone to the
    population effect and calls nearly all patients responders (a real operating
    characteristic, seen in a pilot: 27/28 true responders and 4/7 true
    non-responders called responder), so the rate need not rise with follow-up.
    """
    out = tmp_path / "oc"
    code = main(
        [
            "oc", "--obs", "6,40", "--replicates", "2", "--patients", "60", "--cohorts", "1",
            "--effect", "-3", "--effect-sd", "6", "--residual-sd", "4", "--mcid", "3",
            "--svi-steps", "300", "--out-dir", str(out),
        ]
    )  # fmt: skip
    assert code == 0
    assert "true responders called responder" in capsys.readouterr().out
    result = json.loads((out / "oc.json").read_text())
    assert (out / "oc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| 6 |" in (out / "oc.md").read_text()
    rows = result["rows"]
    assert [row["obs_per_patient"] for row in rows] == [6, 40]
    for row in rows:
        for name, value in row.items():
            if name != "obs_per_patient" and value["n"]:
                assert 0.0 <= value["rate"] <= 1.0 and value["se"] >= 0.0
    low, high = (row["responder_called_responder"] for row in rows)
    for (hits_low, n_low), (hits_high, n_high) in zip(
        low["per_replicate"], high["per_replicate"], strict=True
    ):
        assert n_low == n_high  # the same true responders
        assert hits_high > hits_low, rows
    assert high["rate"] - low["rate"] >= max(0.15, 2.0 * np.hypot(low["se"], high["se"])), rows
    assert all(row["false_nonresponder"]["rate"] <= 0.05 for row in rows)
