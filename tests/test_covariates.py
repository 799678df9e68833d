"""Covariate specifications (model.covariates): encoding and its clear errors."""

from __future__ import annotations

import numpy as np
import pytest

from model.config import Standardization
from model.covariates import (
    CovariateError,
    CovariateSpec,
    design_columns,
    design_standardization,
    encode_patient,
)

AGE = CovariateSpec(name="age", unit="years", plausible_range=(18, 110), location=55, scale=12)
SEX = CovariateSpec(name="sex", kind="categorical", levels=("female", "male", "other"))
BMI = CovariateSpec(name="bmi", unit="kg/m2", location=27, scale=5, required=False)
SPECS = (AGE, SEX, BMI)


def test_design_row_columns_and_standardisation():
    row = encode_patient(SPECS, {"age": 67, "sex": "other", "bmi": 31.5})
    assert design_columns(SPECS) == ("age", "sex=male", "sex=other", "bmi")
    assert row == [67.0, 0.0, 1.0, 31.5]
    location, scale = design_standardization(SPECS)
    std = Standardization(covariate_location=location, covariate_scale=scale)
    np.testing.assert_allclose(std.covariates(np.array(row)), [1.0, 0.0, 1.0, 0.9])
    # The reference level is all zeros; a missing optional value is its centre.
    assert encode_patient(SPECS, {"age": 55, "sex": "female"}) == [55.0, 0.0, 0.0, 27.0]


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"age": 140, "sex": "male"}, "'age' = 140 is outside its plausible range [18, 110] years"),
        ({"age": "old", "sex": "male"}, "'age' must be a number, got 'old'"),
        ({"age": True, "sex": "male"}, "'age' must be a number"),
        ({"age": 40, "sex": "unknown"}, "'sex': unknown level 'unknown' (levels: female, male"),
        ({"sex": "male"}, "'age' is required and missing"),
        ({"age": 40, "sex": "male", "wieght": 80}, "unknown covariate(s) 'wieght'"),
        ({"age": float("nan"), "sex": "male"}, "outside its plausible range"),
    ],
)
def test_bad_values_are_clear_errors(values, message):
    with pytest.raises(CovariateError) as error:
        encode_patient(SPECS, values)
    assert message in str(error.value)


def test_inferred_from_a_column():
    numeric = CovariateSpec.infer("age", ["40", "50", "60"])
    assert numeric.kind == "numeric" and numeric.location == pytest.approx(50.0)
    assert numeric.scale == pytest.approx(np.std([40, 50, 60]))
    categorical = CovariateSpec.infer("site", ["b", "a", "b"])
    assert categorical.levels == ("a", "b") and categorical.columns == ("site=b",)
    with pytest.raises(CovariateError, match="single level"):
        CovariateSpec.infer("site", ["a", "a"])


def test_specifications_are_checked():
    with pytest.raises(ValueError, match="at least two levels"):
        CovariateSpec(name="x", kind="categorical", levels=("a",))
    with pytest.raises(ValueError, match="no levels"):
        CovariateSpec(name="x", levels=("a", "b"))
