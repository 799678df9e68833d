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
