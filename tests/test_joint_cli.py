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
    # the benefits' common factor: with two benefits correlating 0.7 it explains
    # (1 + 0.7) / 2 of their variance and loads √0.85 on each; 90% intervals hold both
    factor = result["effect_factor"]
    assert factor["measures"] == list(NAMES)
    share = factor["variance_share"]
    assert share["q05"] <= 0.85 <= share["q95"]
    for m in range(2):
        assert factor["loadings"]["q05"][m] <= 0.85**0.5 <= factor["loadings"]["q95"][m]
    assert "one common factor carries" in done.stderr + done.stdout

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
    # without --cohort: no cohort level, and nothing of one in the output
    assert "cohorts" not in result and not result["diagnostics"]["cohort_level"]
    assert all("effect_sd_cohorts" not in row for row in result["measures"])
    assert all("cohort" not in p for p in patients)


COHORTS, PER_COHORT = 8, 10
COHORT_SD = (8.0, 0.6)  # raw units, against patient sds 4 and 0.3
SIMULATION = {
    "effect_mean": [-8.0, -0.5],
    "effect_sd": [4.0, 0.3],
    "effect_correlation": 0.5,
    "intercept_mean": [130.0, 7.5],
    "intercept_sd": [15.0, 0.8],
    "residual_sd": np.array([8.0, 0.3]),
    "seed": 7,
}


def write_cohort_programme(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """8 clinics of 10 patients, 10 glucose and 6 HbA1c readings each, every
    clinic's effects shifted (sds 8 and 0.6); returns each patient's cohort (P,),
    the true shifts (G, M) and the true effects (P, M), shifts included."""
    count = COHORTS * PER_COHORT
    cohort = np.repeat(np.arange(COHORTS), PER_COHORT)
    readings = np.column_stack([np.full(count, 10), np.full(count, 6)])
    events, truth = simulate_joint(
        readings, cohort_of_patient=cohort, cohort_effect_sd=COHORT_SD, **SIMULATION
    )
    # The shifts come from their own stream: the same simulation without them
    # differs by exactly each patient's cohort shift.
    _, unshifted = simulate_joint(readings, **SIMULATION)
    shifts = (truth - unshifted)[np.arange(COHORTS) * PER_COHORT]
    assert np.allclose(truth - unshifted, shifts[cohort])
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["patient", "clinic", "measure", "x", "value"])
        for name, each in zip(NAMES, events, strict=True):
            for i, x, y in zip(each.patient, each.exposure, each.outcome, strict=True):
                writer.writerow([f"p{i:03d}", f"clinic{cohort[i]}", name, x, y])
    return cohort, shifts, truth


def test_fit_joint_with_a_cohort_level(tmp_path):
    """--joint --cohort: every cohort's shift of each measure's effect and each
    measure's between-cohort sd, against the simulation's truth.

    Each cohort's effect (population effect plus its shift, identified by its own
    patients) has a 90% interval: if calibrated, the misses of the 16 (8 cohorts
    × 2 measures, nearly independent given the data) are about Binomial(16, 0.1),
    and 6 or more happen with probability 0.3%, so at least 11 must cover (seeds
    5-8 of this simulation: 11, 16, 14 and 16). Dropping the shifts (the
    population effect's interval for every cohort) covers 6. The shift alone
    shares the population effect's error across cohorts (the mean of 8 true
    shifts is absorbed by μ), so it is checked by sign where the true shift is
    larger than the cohorts' sd, and by its correlation with the truth."""
    path, output = tmp_path / "long.csv", tmp_path / "joint.json"
    cohort, shifts, truth = write_cohort_programme(path)
    done = efficacy_fit(
        "--input", str(path), *BASE, "--joint", "--cohort", "clinic", "--output", str(output)
    )
    assert done.returncode == 0, done.stderr
    assert f"a cohort level over {COHORTS} cohorts" in done.stderr
    assert f"effect sd between {COHORTS} cohorts" in done.stderr
    result = json.loads(output.read_text())
    assert result["diagnostics"]["cohort_level"]
    labels = [f"clinic{g}" for g in range(COHORTS)]
    assert [c["cohort"] for c in result["cohorts"]] == labels  # sorted, as a single measure's

    covered = 0
    for m, name in enumerate(NAMES):
        shift = np.array(
            [[c["effect_shift"][name][k] for k in ("mean", "sd", "q05", "q95")]
             for c in result["cohorts"]]
        )  # fmt: skip
        effect = np.array(
            [[c["effect"][name][k] for k in ("mean", "sd", "q05", "q95")]
             for c in result["cohorts"]]
        )  # fmt: skip
        assert np.all((shift[:, 2] < shift[:, 0]) & (shift[:, 0] < shift[:, 3]))
        true_effect = SIMULATION["effect_mean"][m] + shifts[:, m]
        covered += int(np.sum((effect[:, 2] <= true_effect) & (true_effect <= effect[:, 3])))
        large = np.abs(shifts[:, m]) > COHORT_SD[m]
        assert large.sum() >= 2
        assert np.all(np.where(shifts[large, m] > 0, shift[large, 2] > 0, shift[large, 3] < 0))
        assert np.corrcoef(shift[:, 0], shifts[:, m])[0, 1] > 0.9
        # τ_u in raw units: its 90% interval holds the simulation's sd
        sd = result["measures"][m]["effect_sd_cohorts"]
        assert sd["q05"] <= COHORT_SD[m] <= sd["q95"]
        # the patients' effects include their cohort's shift: averaged over a
        # cohort's patients they are the cohort's effect (without the shift they
        # would sit near the population effect, several cohort sds away)
        means = np.array([p["effects"][name]["mean"] for p in result["patients"]])
        average = np.array([means[cohort == g].mean() for g in range(COHORTS)])
        assert np.max(np.abs(average - effect[:, 0]) / effect[:, 1]) < 0.3
        assert np.corrcoef(means, truth[:, m])[0, 1] > 0.85
    assert covered >= 11, covered
    assert [p["cohort"] for p in result["patients"]] == [labels[g] for g in cohort]


def test_fit_joint_refuses_what_it_does_not_model(tmp_path):
    path = tmp_path / "long.csv"
    write_programme(path)
    done = efficacy_fit(
        "--input", str(path), *BASE, "--joint", "--mcid", "1", "--covariates", "day"
    )
    assert done.returncode == 2
    assert "--joint does not take --covariates, --mcid" in done.stderr
    done = efficacy_fit("--input", str(path), *BASE, "--joint", "--cohort", "day,measure")
    assert done.returncode == 2
    assert "--joint takes one --cohort column, got day, measure" in done.stderr
    done = efficacy_fit("--input", str(path), *BASE, "--joint", "arm")
    assert done.returncode == 2
    assert "missing the --joint column 'arm'" in done.stderr
