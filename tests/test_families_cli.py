"""`efficacy fit --family` end to end on small CSV files, and its clear errors."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from test_fit_cli import efficacy_fit

from model.simulate import ProgrammeSpec, simulate_family

BASE = ["--patient", "patient", "--exposure", "exposed", "--outcome", "y", "--cohort", "clinic"]


def write_programme(path: Path, family: str, seed: int = 0) -> None:
    """A small simulated programme as CSV (40 patients, 4 clinics)."""
    spec = ProgrammeSpec(
        num_patients=40, num_cohorts=4, obs_per_patient=30, intercept=-0.3, effect=0.9,
        intercept_sd=0.6, effect_sd=0.4, cohort_effect_sd=0.2, baseline_fraction=0.5,
    )  # fmt: skip
    sim = simulate_family(spec, family, seed, offsets=family == "poisson")
    events = sim.events
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["patient", "clinic", "exposed", "y", "days"])
        offset = np.ones(events.patient.size) if events.offset is None else events.offset
        for i, x, y, e in zip(events.patient, events.exposure, events.outcome, offset, strict=True):
            cohort = events.cohort_of_patient[i]
            writer.writerow([f"p{i:03d}", f"c{cohort}", int(x), int(y), f"{e:.6f}"])


@pytest.mark.parametrize(
    ("family", "flags", "scale"),
    [
        ("bernoulli", ["--effect-scale", "odds_ratio", "--mcid", "1.2"], "odds_ratio"),
        ("poisson", ["--offset", "days", "--mcid", "0.2"], "rate_difference"),
    ],
)
def test_fit_family_end_to_end(tmp_path, family, flags, scale):
    """The file's population effect on the declared scale covers the truth (odds
    ratio e^0.9 ≈ 2.46 in the 90% interval), every patient's interval holds its
    mean, every patient is classified, and the output names the family and scale.
    Accuracy against NUTS is tests/test_families_fidelity.py's."""
    data = tmp_path / f"{family}.csv"
    write_programme(data, family)
    output = tmp_path / "fit.json"
    if scale == "rate_difference":
        flags = [*flags, "--effect-scale", scale]
    result = efficacy_fit(
        "--input", str(data), *BASE, "--family", family, *flags, "--output", str(output)
    )
    assert result.returncode == 0, result.stderr
    fit = json.loads(output.read_text())
    assert fit["measure"]["family"] == family and fit["measure"]["effect_scale"] == scale
    assert fit["diagnostics"]["family"] == family
    assert fit["population"]["sigma"] is None
    effect = fit["population"]["effect"]
    assert effect["q05"] < effect["mean"] < effect["q95"]
    if scale == "odds_ratio":
        assert effect["q05"] < np.exp(0.9) < effect["q95"]
    patients = fit["patients"]
    assert len(patients) == 40
    for patient in patients:
        assert patient["effect"]["q05"] <= patient["effect"]["mean"] <= patient["effect"]["q95"]
        assert 0.0 <= patient["p_benefit_ge_mcid"] <= patient["p_benefit_gt_0"] <= 1.0
    calls = {p["classification"] for p in patients}
    assert calls <= {"responder", "non_responder", "uncertain", "insufficient_data"}


@pytest.mark.parametrize(
    ("family", "row", "flags", "message"),
    [
        ("bernoulli", ["p000", "c0", "1", "2", "1"], [], "must be 0 or 1 for a bernoulli"),
        ("poisson", ["p000", "c0", "1", "-1", "1"], [], "non-negative integer count"),
        ("poisson", ["p000", "c0", "0.5", "1", "1"], [], "'exposed' must be 0 or 1"),
        ("poisson", ["p000", "c0", "1", "1", "0"], ["--offset", "days"], "must be > 0"),
        ("bernoulli", ["p000", "c0", "1", "1", "1"], ["--time", "days"], "no time trend"),
        ("bernoulli", ["p000", "c0", "1", "1", "1"], ["--offset", "days"], "for poisson"),
        ("bernoulli", ["p000", "c0", "1", "1", "1"], ["--effect-scale", "rate_ratio"], "scale"),
    ],
)
def test_family_input_errors(tmp_path, family, row, flags, message):
    data = tmp_path / "bad.csv"
    data.write_text("patient,clinic,exposed,y,days\np001,c1,0,0,1\n" + ",".join(row) + "\n")
    result = efficacy_fit("--input", str(data), *BASE, "--family", family, "--mcid", "1.5", *flags)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
