"""`efficacy fit` on the sleepstudy CSV with both methods, and clear errors on bad files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from sleepstudy_reference import assert_matches_lme4

REPO = Path(__file__).resolve().parent.parent
SLEEPSTUDY = REPO / "tests" / "data" / "sleepstudy" / "sleepstudy.csv"
BASE = ["--patient", "Subject", "--exposure", "Days", "--outcome", "Reaction"]


def efficacy_fit(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cli.main", "fit", *args],
        cwd=REPO, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip


@pytest.mark.parametrize("method", ["svi", "nuts"])
def test_fit_sleepstudy(method, tmp_path):
    output = tmp_path / f"{method}.json"
    result = efficacy_fit(
        "--input", str(SLEEPSTUDY), *BASE, "--direction", "lower", "--mcid", "5",
        "--method", method, "--seed", "1", "--output", str(output), "--min-unexposed", "1",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    fit = json.loads(output.read_text())
    population = fit["population"]
    for name in ("effect", "intercept", "sigma", "effect_sd_patients"):
        assert set(population[name]) == {"mean", "sd", "q05", "q95"}
    # lme4: intercept 251.405 (SE 6.825), residual sd 25.592; the slope is checked
    # with every subject's below
    assert abs(population["intercept"]["mean"] - 251.405) < 2 * 6.825
    assert 22.90 <= population["sigma"]["mean"] <= 28.86
    assert population["effect_sd_cohorts"] is None and population["time_trend"] is None
    patients = fit["patients"]
    assert len(patients) == 18
    # Both methods fit the same model and priors: each must put every subject's
    # slope within half its conditional sd of lme4's and the population slope
    # within 0.25 SE (tolerances argued in tests/sleepstudy_reference.py).
    assert_matches_lme4(
        [p["patient_id"] for p in patients],
        [p["effect"]["mean"] for p in patients],
        population["effect"]["mean"],
    )
    first = patients[0]
    assert first["patient_id"] == "308" and first["cohort"] == "all"
    assert first["effect"]["q05"] < first["effect"]["mean"] < first["effect"]["q95"]
    # Reaction time rising with sleep loss is harm: lower is better, so no benefit.
    harmed = [p for p in patients if p["effect"]["q05"] > 0]
    assert harmed and all(p["classification"] == "non_responder" for p in harmed)
    assert fit["diagnostics"]["method"] == method
    assert "population effect" in result.stderr


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "data.csv"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("Subject,Days\n1,0\n", "missing column(s) 'Reaction'"),
        ("Subject,Days,Reaction\n1,0,250\n1,x,260\n", "data.csv:3: column 'Days' must be numeric"),
        ("Subject,Days,Reaction\n1,0,250\n1,1,\n", "data.csv:3: column 'Reaction' must be numeric"),
        ("Subject,Days,Reaction\n,0,250\n", "data.csv:2: column 'Subject' is empty"),
        ("Subject,Days,Reaction\n", "no data rows"),
    ],
)
def test_bad_files_give_clear_errors(tmp_path, content, message):
    result = efficacy_fit("--input", str(write(tmp_path, content)), *BASE)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_file_is_a_clear_error(tmp_path):
    result = efficacy_fit("--input", str(tmp_path / "nope.csv"), *BASE)
    assert result.returncode == 2 and "input file not found" in result.stderr


def _covariate_programme_csv(path: Path) -> tuple[Path, object]:
    """A simulated programme (model.simulate) with an age modifier, a group
    modifier (written as text levels A/B), a confounded time-varying covariate
    and doses < 1, as the CSV a user would bring."""
    import csv

    from model.simulate import ProgrammeSpec, simulate

    spec = ProgrammeSpec(
        num_patients=150, num_cohorts=5, obs_per_patient=16, with_covariates=True,
        effect_per_year=0.15, group_effects=(-3.0,), time_covariate_effect=2.0,
        time_covariate_confounding=1.0, adherence_low=0.5,
    )  # fmt: skip
    sim = simulate(spec, seed=4)
    events = sim.events
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["patient", "clinic", "day", "dose", "rhr", "age", "group", "activity"])
        for row, i in enumerate(events.patient):
            age, indicator = events.covariates[i]
            writer.writerow([
                f"p{i:03d}", f"c{events.cohort_of_patient[i]}", f"{events.time[row]:.3f}",
                f"{events.exposure[row]:.4f}", f"{events.outcome[row]:.4f}",
                f"{age:.2f}", "B" if indicator else "A", f"{events.time_covariates[row, 0]:.4f}",
            ])  # fmt: skip
    return path, sim.truth


def test_fit_with_covariates_reports_effect_modifiers(tmp_path):
    """`--covariates age,group --time-covariates activity`: the coefficients come
    out named in natural units (group as level B against A), and each true
    modifier lies in its 90% interval (seeded: one miss per coefficient has
    probability 0.1; the band itself is test_covariates_fidelity's and the
    covariates benchmark's)."""
    path, truth = _covariate_programme_csv(tmp_path / "programme.csv")
    output = tmp_path / "fit.json"
    result = efficacy_fit(
        "--input", str(path), "--patient", "patient", "--exposure", "dose", "--outcome", "rhr",
        "--cohort", "clinic", "--time", "day", "--mcid", "2", "--direction", "lower",
        "--covariates", "age,group", "--time-covariates", "activity", "--output", str(output),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    fit = json.loads(output.read_text())
    rows = {row["covariate"]: row for row in fit["coefficients"]}
    assert list(rows) == ["age", "group=B"]
    for name, true_value in (("age", 0.15), ("group=B", -3.0)):
        effect = rows[name]["effect"]
        assert effect["q05"] <= true_value <= effect["q95"], (name, effect)
    (activity,) = fit["time_coefficients"]
    assert activity["covariate"] == "activity"
    assert activity["q05"] <= truth.time_covariate_effect <= activity["q95"]
    assert "effect per unit of age" in result.stderr


def test_a_covariate_that_changes_within_a_patient_is_an_error_naming_them(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("id,x,y,age\na,0,1,50\na,1,2,51\nb,0,1,60\nb,1,2,60\n")
    result = efficacy_fit(
        "--input", str(path), "--patient", "id", "--exposure", "x", "--outcome", "y",
        "--mcid", "1", "--covariates", "age",
    )  # fmt: skip
    assert result.returncode == 2
    assert "patient 'a' has more than one 'age'" in result.stderr
    assert "--time-covariates" in result.stderr


def test_fit_with_two_cohort_columns_reports_every_level(tmp_path):
    """`--cohort clinic,cluster` on a simulated clinic × genotype-cluster
    programme (model.simulate): both levels' sds and groups' effects come out
    labelled, each patient's "cohort" is its clinic, and the clusters' estimated
    effects follow the simulated ones (correlation > 0.9: their spread, sd 3 bpm,
    is ~4 times the posterior sd of one cluster's effect with ~40 patients each)."""
    import csv

    import numpy as np

    from model.simulate import ProgrammeSpec, simulate

    spec = ProgrammeSpec(
        num_patients=200, num_cohorts=6, obs_per_patient=16, cohort_effect_sd=1.0,
        num_clusters=5, cluster_effect_sd=3.0,
    )  # fmt: skip
    sim = simulate(spec, seed=8)
    events = sim.events
    path = tmp_path / "programme.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["patient", "clinic", "cluster", "day", "exposed", "rhr"])
        for row, i in enumerate(events.patient):
            writer.writerow([
                f"p{i:03d}", f"clinic-{events.cohort_of_patient[i]}", f"k{events.groups[i, 0]}",
                f"{events.time[row]:.3f}", f"{events.exposure[row]:.0f}",
                f"{events.outcome[row]:.4f}",
            ])  # fmt: skip
    output = tmp_path / "fit.json"
    result = efficacy_fit(
        "--input", str(path), "--patient", "patient", "--exposure", "exposed", "--outcome",
        "rhr", "--cohort", "clinic,cluster", "--time", "day", "--mcid", "2", "--direction",
        "lower", "--output", str(output),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    fit = json.loads(output.read_text())
    assert fit["diagnostics"]["grouping_levels"] == ["cluster"]
    levels = {level["level"]: level for level in fit["levels"]}
    assert list(levels) == ["clinic", "cluster"]
    assert [g["group"] for g in levels["clinic"]["groups"]] == [f"clinic-{g}" for g in range(6)]
    assert [g["group"] for g in levels["cluster"]["groups"]] == [f"k{k}" for k in range(5)]
    assert levels["clinic"]["effect_sd"] == fit["population"]["effect_sd_cohorts"]
    for level in levels.values():
        assert set(level["effect_sd"]) == {"mean", "sd", "q05", "q95"}
    estimated = [g["effect"]["mean"] for g in levels["cluster"]["groups"]]
    assert np.corrcoef(estimated, sim.truth.cluster_effect)[0, 1] > 0.9
    assert [c["cohort"] for c in fit["cohorts"]] == [f"clinic-{g}" for g in range(6)]
    first = fit["patients"][0]
    assert first["cohort"] == f"clinic-{events.cohort_of_patient[0]}"
    assert "effect sd between cluster groups" in result.stderr


def test_cohort_flag_repeated_or_comma_separated():
    """--cohort a --cohort b,c and --cohort a,b,c name the same levels, in order."""
    import argparse

    from cli.fit import cohort_columns, configure_parser

    parser = argparse.ArgumentParser()
    configure_parser(parser)
    required = ["--input", "x.csv", *BASE]
    repeated = parser.parse_args([*required, "--cohort", "a", "--cohort", "b, c"])
    joined = parser.parse_args([*required, "--cohort", "a,b,c,a"])
    assert cohort_columns(repeated) == cohort_columns(joined) == ["a", "b", "c"]
    assert cohort_columns(parser.parse_args(required)) == []
