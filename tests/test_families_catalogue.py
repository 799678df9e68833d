"""The catalogue's ``family`` and ``effect_scale``: validation of the entries,
and readings a family cannot take dead-lettered with a reason."""

from __future__ import annotations

from pathlib import Path

import pytest

from streams.app import measure_models
from streams.catalogue import Catalogue, CatalogueError
from streams.schemas import Origin
from streams.settings import Settings
from streams.validation import Rejected, validate_observation

ENTRIES = """
[symptom_today]
unit = "yes/no"
direction = "lower"
family = "bernoulli"
effect_scale = "odds_ratio"
mcid = 1.5
plausible = [0.0, 1.0]
typical = [0.0, 1.0]
sources = ["pro"]

[rescue_inhaler_uses]
unit = "uses"
direction = "lower"
family = "poisson"
mcid = 1.25
plausible = [0.0, 50.0]
typical = [0.0, 1.0]
sources = ["pro"]
"""
SETTINGS = Settings(max_age_days=36500.0)
ORIGIN = Origin(topic="pros", partition=0, offset=0)
READING = (
    '{"event_id":"e","event_time":"2026-03-01T00:00:00Z","patient_id":"p",'
    '"measure":"%s","value":%s,"unit":"%s"}'
)


def catalogue(tmp_path: Path, text: str = ENTRIES) -> Catalogue:
    path = tmp_path / "measures.toml"
    path.write_text(text)
    return Catalogue.load(path)


def reading(measure: str, value: str, unit: str) -> bytes:
    return (READING % (measure, value, unit)).encode()


def test_family_entries_load_with_their_scales(tmp_path):
    loaded = catalogue(tmp_path)
    symptom = loaded.get("symptom_today").measure_config()
    assert symptom.family == "bernoulli" and symptom.effect_scale == "odds_ratio"
    inhaler = loaded.get("rescue_inhaler_uses").measure_config()
    assert inhaler.family == "poisson" and inhaler.effect_scale is None  # rate_ratio


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (('effect_scale = "odds_ratio"', 'effect_scale = "rate_ratio"'), "effect scale is one of"),
        (("mcid = 1.5", "mcid = 0.5"), "ratio >= 1"),
        (("plausible = [0.0, 1.0]", "plausible = [0.0, 0.5]"), "must hold 0 and 1"),
        (('family = "bernoulli"', 'family = "binomial"'), "family"),
    ],
)
def test_bad_family_entries_are_clear_errors(tmp_path, change, message):
    with pytest.raises(CatalogueError, match=message):
        catalogue(tmp_path, ENTRIES.replace(*change))


@pytest.mark.parametrize(
    ("measure", "value", "unit"),
    [
        ("symptom_today", "2", "yes/no"),
        ("symptom_today", "0.5", "yes/no"),
        ("rescue_inhaler_uses", "-1", "uses"),
        ("rescue_inhaler_uses", "2.5", "uses"),
    ],
)
def test_values_the_family_cannot_take_are_rejected_with_a_reason(tmp_path, measure, value, unit):
    loaded = catalogue(tmp_path)
    with pytest.raises(Rejected) as error:
        validate_observation("pros", b"p", reading(measure, value, unit), ORIGIN, loaded, SETTINGS)
    assert error.value.reason == "invalid_value"
    assert value in error.value.detail


def test_values_the_family_takes_are_accepted(tmp_path):
    loaded = catalogue(tmp_path)
    for measure, value, unit in (
        ("symptom_today", "1", "yes/no"),
        ("rescue_inhaler_uses", "3", "uses"),
    ):
        observation = validate_observation(
            "pros", b"p", reading(measure, value, unit), ORIGIN, loaded, SETTINGS
        )
        assert observation.value == float(value)


def test_the_stream_carries_families_with_the_cohort_level_only(tmp_path):
    models = measure_models(catalogue(tmp_path), SETTINGS)
    assert models["symptom_today"].family == "bernoulli"
    assert models["rescue_inhaler_uses"].family == "poisson"
    grouped = ENTRIES.replace(
        'sources = ["pro"]\n', 'sources = ["pro"]\ngrouping_levels = ["site"]\n', 1
    )
    with pytest.raises(CatalogueError, match="cohort level only"):
        measure_models(catalogue(tmp_path, grouped), SETTINGS)
