"""The measure catalogue: shipped defaults, unit conversions, user files, errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from streams.catalogue import DEFAULT_CATALOGUE, Catalogue, CatalogueError, UnknownUnit

ISSUE_MEASURES = {
    "resting_heart_rate",
    "daily_steps",
    "sleep_minutes",
    "hba1c",
    "systolic_bp",
    "ldl_cholesterol",
    "phq9",
    "promis_physical_function",
}


def test_shipped_catalogue_loads_with_sensible_entries():
    catalogue = Catalogue.load()
    assert set(catalogue.measures) >= ISSUE_MEASURES
    for spec in catalogue.measures.values():
        low, high = spec.plausible
        location, _ = spec.typical
        assert low < location < high, spec.name
        assert 0 < spec.mcid < high - low, spec.name
        assert spec.sources, spec.name
    assert Catalogue.load(DEFAULT_CATALOGUE) == catalogue


@pytest.mark.parametrize(
    ("measure", "value", "unit", "expected", "tolerance"),
    [
        # IFCC/NGSP master equation: 53 mmol/mol = 7.0 %, 48 mmol/mol = 6.5 %
        ("hba1c", 53.0, "mmol/mol", 7.0, 0.01),
        ("hba1c", 48.0, "mmol/mol", 6.5, 0.05),
        # glucose: 7.0 mmol/L = 126 mg/dL (the diabetes threshold in both units)
        ("fasting_glucose", 7.0, "mmol/L", 126.0, 0.2),
        # LDL cholesterol: 2.59 mmol/L = 100 mg/dL
        ("ldl_cholesterol", 2.59, "mmol/L", 100.0, 0.3),
        # 16 kPa = 120 mmHg
        ("systolic_bp", 16.0, "kPa", 120.0, 0.1),
        ("sleep_minutes", 7.5, "h", 450.0, 1e-9),
        ("daily_steps", 6.5, "ksteps", 6500.0, 1e-9),
        ("resting_heart_rate", 61.0, "bpm", 61.0, 0.0),
    ],
)
def test_conversions_match_published_values(measure, value, unit, expected, tolerance):
    spec = Catalogue.load().get(measure)
    assert spec.to_canonical(value, unit) == pytest.approx(expected, abs=tolerance)


def test_unknown_unit_names_the_accepted_units():
    spec = Catalogue.load().get("hba1c")
    with pytest.raises(UnknownUnit, match="mmol/mol") as error:
        spec.to_canonical(7.0, "mg/dL")
    assert "'mg/dL'" in str(error.value)


def test_unknown_measure():
    with pytest.raises(KeyError):
        Catalogue.load().get("blood_type")


def test_plausibility():
    spec = Catalogue.load().get("resting_heart_rate")
    assert spec.plausible_value(60.0)
    assert not spec.plausible_value(400.0)
    assert not spec.plausible_value(float("nan"))


USER_FILE = """
[grip_strength]
unit = "kg"
direction = "higher"
mcid = 6.5
plausible = [0.0, 100.0]
typical = [30.0, 8.0]
sources = ["wearable"]
units = { "lb" = { scale = 0.45359237 } }
"""


def test_a_user_catalogue_file_is_read(tmp_path):
    path = tmp_path / "my-measures.toml"
    path.write_text(USER_FILE)
    catalogue = Catalogue.load(path)
    assert set(catalogue.measures) == {"grip_strength"}
    spec = catalogue.get("grip_strength")
    assert spec.direction == "higher" and spec.sources == ("wearable",)
    assert spec.to_canonical(100.0, "lb") == pytest.approx(45.359237)


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ("[grip_strength\nunit = 'kg'", "not valid TOML"),
        (USER_FILE.replace("plausible = [0.0, 100.0]", "plausible = [100.0, 0.0]"), "grip"),
        (USER_FILE.replace('direction = "higher"', 'direction = "up"'), "grip_strength"),
        (USER_FILE.replace("scale = 0.45359237", "scale = -1.0"), "grip_strength"),
        ("answer = 42\n", "answer"),
        ("", "no measures"),
    ],
)
def test_a_broken_file_gives_a_catalogue_error_naming_it(tmp_path, text, names):
    path = tmp_path / "broken.toml"
    path.write_text(text)
    with pytest.raises(CatalogueError) as error:
        Catalogue.load(path)
    assert str(path) in str(error.value)
    assert names in str(error.value)


def test_a_missing_file_gives_a_catalogue_error(tmp_path):
    with pytest.raises(CatalogueError, match="not found"):
        Catalogue.load(tmp_path / "absent.toml")


def test_interoperable_codes_of_the_shipped_catalogue():
    """Codes a FHIR or Open mHealth record is mapped by (docs/ingest.md)."""
    from streams.interop.open_mhealth import conditions

    catalogue = Catalogue.load()
    assert catalogue.by_loinc("8480-6").name == "systolic_bp"
    assert catalogue.by_loinc("4548-4").name == "hba1c"
    assert catalogue.by_loinc("8462-4") is None  # diastolic: no measure
    assert [spec.name for spec, _ in catalogue.omh_codes("omh:blood-pressure")] == ["systolic_bp"]
    for spec in catalogue.measures.values():
        for code in spec.omh:
            for field, values in conditions(code).items():
                assert field and all(values), (spec.name, code)
    # UCUM spellings are aliases of the measure's units, converted like them
    assert catalogue.get("systolic_bp").to_canonical(107.0, "mm[Hg]") == 107.0
    assert catalogue.get("resting_heart_rate").resolve_unit("/min") == "bpm"
    assert catalogue.get("phq9").resolve_unit("{score}") == "score"
    with pytest.raises(UnknownUnit):
        catalogue.get("resting_heart_rate").resolve_unit("mm[Hg]")


def test_a_loinc_code_listed_by_two_measures_is_refused(tmp_path):
    shipped = Path(DEFAULT_CATALOGUE).read_text()
    path = tmp_path / "measures.toml"
    path.write_text(shipped.replace('loinc = ["44261-6"]', 'loinc = ["8867-4"]'))
    with pytest.raises(CatalogueError, match="8867-4"):
        Catalogue.load(path)


def test_a_ucum_alias_must_name_a_unit_of_the_measure(tmp_path):
    shipped = Path(DEFAULT_CATALOGUE).read_text()
    path = tmp_path / "measures.toml"
    path.write_text(shipped.replace('"mm[Hg]" = "mmHg"', '"mm[Hg]" = "torr"'))
    with pytest.raises(CatalogueError, match="torr"):
        Catalogue.load(path)


def test_grouping_levels_name_enrolment_attributes(tmp_path):
    """A measure's ``grouping_levels`` become its model's further levels; the
    catalogue knows every measure's (what enrolments are checked against); the
    cohort, a repeated name or a name that is not a plain word is refused."""
    path = tmp_path / "measures.toml"
    path.write_text(
        USER_FILE.replace(
            "[grip_strength]\n", '[grip_strength]\ngrouping_levels = ["site", "genotype"]\n'
        )
    )
    catalogue = Catalogue.load(path)
    spec = catalogue.get("grip_strength")
    assert spec.grouping_levels == ("site", "genotype")
    assert catalogue.grouping_levels == ("genotype", "site")
    model = spec.model_config_for(time_origin_days=0.0, time_scale_days=30.0, half_life_days=None)
    assert model.grouping_levels == ("site", "genotype") and model.cohort_level
    assert Catalogue.load().grouping_levels == ()  # the shipped catalogue: the cohorts only
    for levels in ('["cohort"]', '["site", "site"]', '["site name"]', '[""]'):
        path.write_text(
            USER_FILE.replace("[grip_strength]\n", f"[grip_strength]\ngrouping_levels = {levels}\n")
        )
        with pytest.raises(CatalogueError, match="grouping_levels"):
            Catalogue.load(path)


SMOOTH_COVARIATES = """
[covariates.age]
kind = "numeric"
unit = "years"
plausible = [18.0, 110.0]
typical = [55.0, 12.0]

[covariates.sex]
kind = "categorical"
levels = ["female", "male"]

[covariates.activity]
kind = "numeric"
varies = "reading"
required = false
"""

GRIP_BP_JOINT = """
[diastolic]
unit = "mmHg"
direction = "lower"
mcid = 3.0
plausible = [20.0, 200.0]
typical = [80.0, 10.0]

[joint.strength]
measures = ["grip_strength", "diastolic"]
"""


def _with_grip(tmp_path, keys: str, extra: str = "") -> Path:
    path = tmp_path / "measures.toml"
    path.write_text(
        USER_FILE.replace("[grip_strength]\n", f"[grip_strength]\n{keys}\n") + SMOOTH_COVARIATES
        + extra
    )  # fmt: skip
    return path


def test_smooth_terms_are_declared_per_measure(tmp_path):
    """``smooth`` names numeric patient covariates whose effect is a curve and
    ``daily_cycle`` the harmonics of the readings' daily cycle; the measure's
    streaming model gets their columns (the others' stays linear) and the
    spline's knots from the covariate's entry alone: its boundary is the
    plausible range cut to 3 scales either side of the typical value (here 19
    to 91 years, standardised ±3), the knots inside it."""
    catalogue = Catalogue.load(_with_grip(tmp_path, 'smooth = ["age"]\ndaily_cycle = 3'))
    spec = catalogue.get("grip_strength")
    assert spec.smooth == ("age",) and spec.daily_cycle == 3
    model = spec.model_config_for(
        time_origin_days=0.0, time_scale_days=30.0, half_life_days=None,
        covariates=catalogue.covariates,
    )  # fmt: skip
    assert model.covariates == ("age", "sex=male", *(f"age:s{k}" for k in range(1, 7)))
    assert model.time_covariates[0] == "activity" and len(model.time_covariates) == 7
    assert model.time_covariates[-2:] == ("hour:cos3", "hour:sin3")
    (basis,) = model.splines
    assert basis.boundary == (-3.0, 3.0) and len(basis.knots) == 4
    assert all(-3.0 < knot < 3.0 for knot in basis.knots)
    # Without the keys: no spline, no cycle (the shipped catalogue declares none).
    plain = Catalogue.load(_with_grip(tmp_path, "")).get("grip_strength")
    assert plain.smooth == () and plain.daily_cycle == 0
    assert not any(spec.smooth or spec.daily_cycle for spec in Catalogue.load().measures.values())
    # A narrow plausible range is the boundary where it is inside the 3 scales.
    narrow = catalogue.covariates[0].model_copy(update={"plausible_range": (40.0, 110.0)})
    assert narrow.spline().boundary == pytest.approx(((40.0 - 55.0) / 12.0, 3.0))


@pytest.mark.parametrize(
    ("keys", "extra", "message"),
    [
        ('smooth = ["height"]', "", "'height' is not a numeric patient covariate"),
        ('smooth = ["sex"]', "", "'sex' is not a numeric patient covariate"),
        ('smooth = ["activity"]', "", "'activity' is not a numeric patient covariate"),
        ('smooth = ["age", "age"]', "", "smooth repeats"),
        ("daily_cycle = 7", "", "daily_cycle"),
        ("daily_cycle = -1", "", "daily_cycle"),
        ('smooth = "age"', "", "smooth"),
        ('family = "poisson"\nsmooth = ["age"]', "", "poisson measure takes no smooth"),
        ('family = "bernoulli"\ndaily_cycle = 1', "", "bernoulli measure takes no smooth"),
        ('smooth = ["age"]', GRIP_BP_JOINT, "joint group strength: grip_strength declares"),
        ("daily_cycle = 2", GRIP_BP_JOINT, "the joint model takes no covariates"),
    ],
)
def test_smooth_terms_the_catalogue_refuses(tmp_path, keys, extra, message):
    """An unknown, categorical or reading covariate, a repeated name, harmonics
    out of 0-6, a family measure (its effect is read on a ratio or link scale
    and it has no time covariates) and a joint group's measure (the joint
    model takes no covariates) are CatalogueErrors naming the measure."""
    if "family" in keys:
        plausible = "plausible = [0.0, 100.0]" if "poisson" in keys else "plausible = [0.0, 1.0]"
        text = USER_FILE.replace("mcid = 6.5", "mcid = 1.5").replace(
            "plausible = [0.0, 100.0]", plausible
        )
        path = tmp_path / "measures.toml"
        path.write_text(
            text.replace("[grip_strength]\n", f"[grip_strength]\n{keys}\n") + SMOOTH_COVARIATES
        )
    else:
        path = _with_grip(tmp_path, keys, extra)
    with pytest.raises(CatalogueError, match=message) as error:
        Catalogue.load(path)
    assert "grip_strength" in str(error.value) or "strength" in str(error.value)


def test_a_smooth_covariate_needs_room_for_its_curve(tmp_path):
    """A plausible range outside 3 scales of the typical value leaves no span
    to bend in: a CatalogueError naming the measure and the covariate."""
    path = _with_grip(tmp_path, 'smooth = ["age"]')
    path.write_text(
        path.read_text().replace("plausible = [18.0, 110.0]", "plausible = [95.0, 110.0]")
    )
    with pytest.raises(
        CatalogueError,
        match=r"grip_strength: smooth covariate age: the plausible range .* lies outside 3 scales",
    ):
        Catalogue.load(path)
