"""``efficacy fit --joint``: a long CSV of two catalogue measures fitted jointly,
checked against the simulation's ground truth, and the options it refuses."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from model.simulate import simulate_joint

REPO = Path(__file__).resolve().parents[1]
NAMES = ("fasting_glucose", "hba1c")
BASE = ["--patient", "patient", "--exposure", "x", "--outcome", "value"]


def efficacy_fit(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cli.main", "fit", *args],
        cwd=REPO, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip


def write_programme(path: Path) -> np.ndarray:
    """80 patients, 10 glucose and 6 HbA1c readings each, effects correlating 0.7;
    returns the true effects (P, 2)."""
    events, truth = simulate_joint(
        np.column_stack([np.full(80, 10), np.full(80, 6)]),
        effect_mean=[-8.0, -0.5],
        effect_sd=[6.0, 0.4],
        effect_correlation=0.7,
        intercept_mean=[130.0, 7.5],
        intercept_sd=[15.0, 0.8],
        residual_sd=np.array([8.0, 0.3]),
        seed=11,
    )
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["patient", "measure", "x", "value", "day"])
        for name, each in zip(NAMES, events, strict=True):
            for i, x, y, t in zip(
                each.patient, each.exposure, each.outcome, each.time, strict=True
            ):
                writer.writerow([f"p{i:03d}", name, x, y, t])
    return truth


def test_fit_joint_reports_measures_correlation_and_patients(tmp_path):
    path, output = tmp_path / "long.csv", tmp_path / "joint.json"
    truth = write_programme(path)
    done = efficacy_fit("--input", str(path), *BASE, "--joint", "--output", str(output))
    assert done.returncode == 0, done.stderr
    result = json.loads(output.read_text())

    assert [row["measure"] for row in result["measures"]] == list(NAMES)
    assert {row["direction"] for row in result["measures"]} == {"lower"}  # the catalogue's
    # 90% intervals of the population effects hold the simulation's means (-8, -0.5)
    for row, true_mean in zip(result["measures"], (-8.0, -0.5), strict=True):
        assert row["effect"]["q05"] <= true_mean <= row["effect"]["q95"]
    correlation = result["effect_correlation"]
    assert correlation["measures"] == list(NAMES)
    assert np.allclose(np.diag(correlation["mean"]), 1.0)
    # the effects' correlation is 0.7: its 90% interval holds it, and excludes 0
    assert correlation["q05"][0][1] <= 0.7 <= correlation["q95"][0][1]
    assert correlation["q05"][0][1] > 0.0

    patients = result["patients"]
    assert [p["patient_id"] for p in patients] == [f"p{i:03d}" for i in range(80)]
    for m, name in enumerate(NAMES):
        means = np.array([p["effects"][name]["mean"] for p in patients])
        assert np.corrcoef(means, truth[:, m])[0, 1] > 0.6
        assert {p["effects"][name]["observations"] for p in patients} == {(10, 6)[m]}
    # responsiveness: benefit is a fall on both measures, so it tracks −(standardised effects)
    rho = np.array([p["responsiveness"]["mean"] for p in patients])
    signed = -(truth - truth.mean(axis=0)) / truth.std(axis=0)
    assert np.corrcoef(rho, signed.mean(axis=1))[0, 1] > 0.6
    p_above = np.array([p["responsiveness"]["p_above_population"] for p in patients])
    assert np.all((p_above >= 0) & (p_above <= 1))
    assert np.corrcoef(p_above, rho)[0, 1] > 0.8


def test_fit_joint_refuses_what_it_does_not_model(tmp_path):
    path = tmp_path / "long.csv"
    write_programme(path)
    done = efficacy_fit("--input", str(path), *BASE, "--joint", "--cohort", "day", "--mcid", "1")
    assert done.returncode == 2
    assert "--joint does not take --cohort, --mcid" in done.stderr
    done = efficacy_fit("--input", str(path), *BASE, "--joint", "arm")
    assert done.returncode == 2
    assert "missing the --joint column 'arm'" in done.stderr
