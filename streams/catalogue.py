"""The measure catalogue: canonical units, conversions, plausibility, direction
of benefit, MCID and standardisation of every outcome measure.

Shipped as ``streams/measures.toml``; users point ``EFFICACY_MEASURES_FILE`` at
their own file with the same layout. A value in an accepted unit converts to
the canonical unit as ``canonical = value * scale + offset``.

Interoperable inputs (streams.interop) find their measure by code: ``loinc``
lists the LOINC codes of a measure (FHIR Observations and their components),
``omh`` the Open mHealth quantities (``namespace:schema#property``, optionally
``?field=value|value`` conditions, streams.interop.open_mhealth), and ``ucum``
maps UCUM unit codes to the measure's unit names.

The same file may declare patient covariates under ``[covariates.<name>]``
(model.covariates.CovariateSpec: kind, unit, plausible range, typical value and
spread, categorical levels, required). Enrolments carry their values; every
measure's model then lets them shift each patient's expected effect (effect
modifiers) and intercept. A measure's ``grouping_levels`` names enrolment
attributes (``attributes`` of an Enrollment) that are further grouping levels
of its model next to the cohort (ModelConfig.grouping_levels: each adds a
random deviation of the effect per group; docs/covariates.md).
A measure's ``family`` is its outcome's distribution: ``gaussian`` (default),
``bernoulli`` (a 0/1 value, e.g. "symptom today?") or ``poisson`` (a count, e.g.
rescue-inhaler uses), and ``effect_scale`` the scale of its effect and MCID
(model.family_scores: odds_ratio, risk_difference or log_odds_ratio for
Bernoulli; rate_ratio, rate_difference or log_rate_ratio for Poisson).
Readings a family cannot take are dead-lettered (``invalid_value``).
A Gaussian measure's ``smooth`` names numeric patient covariates whose effect
is a penalised spline rather than a line, and ``daily_cycle = K`` adds K
Fourier harmonics of each reading's hour of day on its own clock
(model.smooth; CovariateSpec.spline fixes the knots from the covariate's
entry, MeasureSpec.time_covariate_row adds the Fourier terms). The measure's
posterior publishes the fitted curves (docs/covariates.md).
``[subgroups.<name>]`` declares subgroups
(model.subgroups.SubgroupSpec: cohorts, covariate ranges and levels) whose mean
effect the population agent publishes (docs/covariates.md).

``[joint.<name>]`` declares a joint group: ``measures`` lists 2-6 Gaussian
measures of the catalogue (each in at most one group) modelled together by
model.joint, so each measure's patient effect borrows strength from the
others' and every patient gets a latent responsiveness score
(streams.joint_stream; docs/pipeline.md). Example::

    [joint.glycaemic]
    measures = ["hba1c", "fasting_glucose"]
"""

from __future__ import annotations

import math
import re
import tomllib
from datetime import datetime
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

from model.config import MeasureConfig, ModelConfig, Standardization, check_scale, default_scale
from model.covariates import CovariateSpec, design_columns, design_standardization
from model.smooth import fourier_columns, fourier_design
from model.subgroups import SubgroupSpec

DEFAULT_CATALOGUE = Path(__file__).with_name("measures.toml")
Source = Literal["wearable", "lab", "pro"]
LOINC_CODE = re.compile(r"^[0-9]{1,7}-[0-9]$")
OMH_CODE = re.compile(r"^[a-z0-9-]+:[a-z0-9-]+#[a-z0-9_]+(\?[^?]+)?$")


#: Most harmonics of a measure's daily cycle: the sixth has a 4-hour period,
#: finer than the cycles of the clock that wearables show; more would chase noise.
MAX_DAILY_HARMONICS = 6
#: The daily cycle's Fourier columns are named after it: hour:cos1, hour:sin1, …
CYCLE_COLUMN = "hour"


class CatalogueError(ValueError):
    """The catalogue file is missing or invalid; the message names the file and entry."""


class UnknownMeasure(KeyError):
    pass


class UnknownUnit(ValueError):
    pass


class UnitConversion(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    scale: float = Field(gt=0.0)
    offset: float = 0.0


#: A further grouping level: the name of an enrolment attribute (not the cohort,
#: which is always the first level).
GroupingLevel = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$"), AfterValidator(
    lambda name: _not_cohort(name))]  # fmt: skip


def _not_cohort(name: str) -> str:
    if name == "cohort":
        raise ValueError("'cohort' is always the first grouping level: name another attribute")
    return name


class MeasureSpec(BaseModel):
    """One measure of the catalogue (see the header of measures.toml)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    unit: str
    direction: Literal["higher", "lower"]
    mcid: float = Field(ge=0.0)
    plausible: tuple[float, float]
    weight: float = Field(default=1.0, ge=0.0)
    typical: tuple[float, float]
    sources: tuple[Source, ...] = ("wearable", "lab", "pro")
    units: dict[str, UnitConversion] = Field(default_factory=dict)
    loinc: tuple[str, ...] = ()
    omh: tuple[str, ...] = ()
    ucum: dict[str, str] = Field(default_factory=dict)
    grouping_levels: tuple[GroupingLevel, ...] = ()
    family: Literal["gaussian", "bernoulli", "poisson"] = "gaussian"
    effect_scale: str | None = None
    smooth: tuple[str, ...] = ()
    daily_cycle: int = Field(default=0, ge=0, le=MAX_DAILY_HARMONICS)

    @model_validator(mode="after")
    def _consistent(self) -> MeasureSpec:
        low, high = self.plausible
        if not low < high:
            raise ValueError(f"plausible must be [low, high] with low < high, got {self.plausible}")
        if self.typical[1] <= 0:
            raise ValueError("typical scale must be > 0")
        for code in self.loinc:
            if not LOINC_CODE.match(code):
                raise ValueError(f"loinc: {code!r} is not a LOINC code (like 8867-4)")
        for code in self.omh:
            if not OMH_CODE.match(code):
                raise ValueError(f"omh: {code!r} is not namespace:schema#property[?conditions]")
        for spelling, unit in self.ucum.items():
            if unit != self.unit and unit not in self.units:
                raise ValueError(f"ucum: {spelling!r} maps to {unit!r}, not a unit of {self.name}")
        if len(set(self.grouping_levels)) != len(self.grouping_levels):
            raise ValueError(f"grouping_levels repeat a name: {list(self.grouping_levels)}")
        check_scale(self.family, self.effect_scale or default_scale(self.family), self.mcid)
        if len(set(self.smooth)) != len(self.smooth):
            raise ValueError(f"smooth repeats a covariate: {list(self.smooth)}")
        if self.family != "gaussian" and (self.smooth or self.daily_cycle):
            raise ValueError(
                f"a {self.family} measure takes no smooth or daily_cycle: its effect is read on "
                "a ratio or link scale and it has no time-varying covariates; smooth terms are "
                "for gaussian measures"
            )
        if self.family == "bernoulli" and not (low <= 0.0 and high >= 1.0):
            raise ValueError(
                f"a bernoulli measure's plausible range must hold 0 and 1, got {self.plausible}"
            )
        if self.family == "poisson" and low > 0.0:
            raise ValueError(
                f"a poisson measure's plausible range must hold 0, got {self.plausible}"
            )
        return self

    def family_value(self, value: float) -> str | None:
        """Why a canonical value is not one of the family's outcomes (a Bernoulli
        value must be 0 or 1, a Poisson count a non-negative integer), or None."""
        if self.family == "bernoulli" and value not in (0.0, 1.0):
            return f"{self.name} is a yes/no measure: a value must be 0 or 1, got {value:g}"
        if self.family == "poisson" and not (value >= 0.0 and float(value).is_integer()):
            return f"{self.name} is a count: a value must be a non-negative integer, got {value:g}"
        return None

    def resolve_unit(self, unit: str) -> str:
        """The measure's name of ``unit`` (itself, or the unit a UCUM code in
        ``ucum`` stands for); UnknownUnit for a unit it does not accept."""
        unit = self.ucum.get(unit, unit)
        if unit != self.unit and unit not in self.units:
            accepted = ", ".join([self.unit, *self.units, *self.ucum])
            raise UnknownUnit(f"{self.name} accepts units {accepted}, not {unit!r}")
        return unit

    def to_canonical(self, value: float, unit: str) -> float:
        """The value in the canonical unit; UnknownUnit for a unit not listed."""
        unit = self.resolve_unit(unit)
        if unit == self.unit:
            return value
        conversion = self.units[unit]
        return value * conversion.scale + conversion.offset

    def plausible_value(self, value: float) -> bool:
        low, high = self.plausible
        return math.isfinite(value) and low <= value <= high

    def time_covariate_row(self, values: list[float], event_time: datetime) -> list[float]:
        """A reading's time-varying covariate row for this measure's model
        (ModelConfig.time_covariates, natural units): the catalogue's reading
        covariates (``values``) and, with a ``daily_cycle`` of K, the K Fourier
        pairs of the reading's hour of day on its own clock (the UTC offset its
        event_time carries: 07:30+02:00 is 7.5)."""
        if not self.daily_cycle:
            return values
        clock = event_time.time()
        hour = clock.hour + clock.minute / 60.0 + (clock.second + clock.microsecond / 1e6) / 3600.0
        return [*values, *fourier_design(np.array([hour]), self.daily_cycle)[0].tolist()]

    def measure_config(self) -> MeasureConfig:
        return MeasureConfig(
            name=self.name,
            unit=self.unit,
            direction=self.direction,
            mcid=self.mcid,
            plausible_range=self.plausible,
            weight=self.weight,
            family=self.family,
            effect_scale=self.effect_scale,
        )

    def model_config_for(
        self,
        *,
        time_origin_days: float,
        time_scale_days: float,
        half_life_days: float | None,
        recent_half_life_days: float | None = None,
        covariates: tuple[CovariateSpec, ...] = (),
    ) -> ModelConfig:
        """The streaming model of this measure. Time is in days since the Unix
        epoch (UTC), shifted to the programme's origin and scaled so that the time
        trend's prior means "per ``time_scale_days``". Standardisation is fixed
        by configuration so statistics stay comparable forever (they are stored
        standardised); the patient ``covariates`` are standardised by their
        catalogue entries' typical value and spread.

        A Bernoulli or Poisson measure's model (``family``) has no time trend,
        no time-varying covariates and no recent-window forgetting (its evidence
        is cell statistics, model.families; the drift agent's Gaussian checks do
        not apply to it), and its outcome is not standardised: a 0/1 value or a
        count is the model's own scale."""
        if self.family != "gaussian":
            baseline = [c for c in covariates if c.varies == "patient"]
            covariate_location, covariate_scale = design_standardization(baseline)
            return ModelConfig(
                time_trend=False,
                cohort_level=True,
                grouping_levels=self.grouping_levels,
                covariates=design_columns(baseline),
                half_life=half_life_days,
                family=self.family,
                standardization=Standardization(
                    outcome_location=0.0,
                    outcome_scale=1.0,
                    exposure_scale=1.0,
                    time_location=time_origin_days,
                    time_scale=time_scale_days,
                    covariate_location=covariate_location,
                    covariate_scale=covariate_scale,
                ),
            )
        location, scale = self.typical
        baseline = [c for c in covariates if c.varies == "patient"]
        by_reading = [c for c in covariates if c.varies == "reading"]
        columns = design_columns(baseline)
        covariate_location, covariate_scale = design_standardization(baseline)
        time_columns = design_columns(by_reading)
        time_location, time_scale = design_standardization(by_reading)
        by_name = {c.name: c for c in baseline}
        splines = tuple(by_name[name].spline() for name in self.smooth)
        for basis in splines:  # centred at the typical value; unscaled: Σ u² = ∫ f''²
            columns += basis.columns
            covariate_location += tuple(basis.design(np.zeros(1))[0].tolist())
            covariate_scale += (1.0,) * len(basis.columns)
        if self.daily_cycle:  # a Fourier term's mean and sd over a day: 0 and √½
            time_columns += fourier_columns(CYCLE_COLUMN, self.daily_cycle)
            time_location += (0.0,) * (2 * self.daily_cycle)
            time_scale += (math.sqrt(0.5),) * (2 * self.daily_cycle)
        return ModelConfig(
            time_trend=True,
            cohort_level=True,
            grouping_levels=self.grouping_levels,
            covariates=columns,
            time_covariates=time_columns,
            splines=splines,
            half_life=half_life_days,
            recent_half_life=recent_half_life_days,
            standardization=Standardization(
                outcome_location=location,
                outcome_scale=scale,
                exposure_scale=1.0,
                time_location=time_origin_days,
                time_scale=time_scale_days,
                covariate_location=covariate_location,
                covariate_scale=covariate_scale,
                time_covariate_location=time_location,
                time_covariate_scale=time_scale,
            ),
        )


class JointGroupSpec(BaseModel):
    """A joint group (``[joint.<name>]``): the measures model.joint fits together."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    measures: tuple[str, ...] = Field(min_length=2, max_length=6)

    @model_validator(mode="after")
    def _distinct(self) -> JointGroupSpec:
        if len(set(self.measures)) != len(self.measures):
            raise ValueError(f"measures repeat a name: {list(self.measures)}")
        return self


class Catalogue(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    measures: dict[str, MeasureSpec]
    covariates: tuple[CovariateSpec, ...] = ()
    subgroups: tuple[SubgroupSpec, ...] = ()
    joint: tuple[JointGroupSpec, ...] = ()

    @model_validator(mode="after")
    def _codes_unique(self) -> Catalogue:
        owner: dict[str, str] = {}
        for spec in self.measures.values():
            for code in spec.loinc:
                if owner.setdefault(code, spec.name) != spec.name:
                    raise ValueError(f"LOINC {code} is listed by {owner[code]} and {spec.name}")
        for subgroup in self.subgroups:
            subgroup.check(self.patient_covariates)
            unknown = sorted(set(subgroup.measures) - set(self.measures))
            if unknown:
                raise ValueError(f"subgroup {subgroup.name}: unknown measure(s) {unknown}")
        numeric = {c.name for c in self.patient_covariates if c.kind == "numeric"}
        by_name = {c.name: c for c in self.patient_covariates}
        for spec in self.measures.values():
            for name in spec.smooth:
                if name not in numeric:
                    raise ValueError(
                        f"{spec.name}: smooth covariate {name!r} is not a numeric patient "
                        f"covariate of the catalogue (those are {', '.join(sorted(numeric)) or 'none'})"
                    )
                try:  # a plausible range that leaves room for a curve
                    by_name[name].spline()
                except ValueError as error:
                    raise ValueError(f"{spec.name}: smooth covariate {error}") from None
        group_of: dict[str, str] = {}
        for group in self.joint:
            for name in group.measures:
                if name not in self.measures:
                    raise ValueError(f"joint group {group.name}: unknown measure {name!r}")
                family = self.measures[name].family
                if family != "gaussian":
                    raise ValueError(
                        f"joint group {group.name}: {name} is a {family} measure; "
                        "the joint model takes Gaussian measures only"
                    )
                if self.measures[name].smooth or self.measures[name].daily_cycle:
                    raise ValueError(
                        f"joint group {group.name}: {name} declares smooth or daily_cycle; "
                        "the joint model takes no covariates"
                    )
                other = group_of.setdefault(name, group.name)
                if other != group.name:
                    raise ValueError(
                        f"{name} is in joint groups {other} and {group.name}: at most one"
                    )
        return self

    def joint_group_of_name(self, name: str) -> JointGroupSpec:
        """The joint group called ``name`` (KeyError if none)."""
        for group in self.joint:
            if group.name == name:
                return group
        raise KeyError(name)

    def joint_group_of(self, measure: str) -> JointGroupSpec | None:
        """The joint group ``measure`` belongs to, or None."""
        return next((group for group in self.joint if measure in group.measures), None)

    @property
    def patient_covariates(self) -> tuple[CovariateSpec, ...]:
        """Baseline covariates: what enrolments carry."""
        return tuple(c for c in self.covariates if c.varies == "patient")

    @property
    def grouping_levels(self) -> tuple[str, ...]:
        """Every measure's further grouping levels (enrolment attributes), sorted:
        what an enrolment's attributes are checked against and a patient's
        record keeps."""
        return tuple(sorted({level for m in self.measures.values() for level in m.grouping_levels}))

    @property
    def reading_covariates(self) -> tuple[CovariateSpec, ...]:
        """Time-varying covariates: what readings carry."""
        return tuple(c for c in self.covariates if c.varies == "reading")

    def subgroups_of(self, measure: str) -> tuple[SubgroupSpec, ...]:
        """The subgroups scored for ``measure``."""
        return tuple(s for s in self.subgroups if not s.measures or measure in s.measures)

    def get(self, name: str) -> MeasureSpec:
        try:
            return self.measures[name]
        except KeyError:
            raise UnknownMeasure(name) from None

    def by_loinc(self, code: str) -> MeasureSpec | None:
        """The measure a LOINC code stands for, or None."""
        for spec in self.measures.values():
            if code in spec.loinc:
                return spec
        return None

    def omh_codes(self, schema: str) -> list[tuple[MeasureSpec, str]]:
        """(measure, code) of every ``omh`` code of Open mHealth schema
        ``namespace:name`` (the part of the code before ``#``)."""
        return [
            (spec, code)
            for spec in self.measures.values()
            for code in spec.omh
            if code.split("#", 1)[0] == schema
        ]

    @classmethod
    def load(cls, path: Path | None = None) -> Catalogue:
        """Read a catalogue file (default: the shipped measures.toml)."""
        path = Path(path) if path else DEFAULT_CATALOGUE
        try:
            raw = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise CatalogueError(f"measure catalogue not found: {path}") from None
        except tomllib.TOMLDecodeError as error:
            raise CatalogueError(f"{path}: not valid TOML: {error}") from None
        measures = {}
        covariates = []
        for name, entry in (raw.pop("covariates", None) or {}).items():
            if not isinstance(entry, dict):
                raise CatalogueError(f"{path}: [covariates.{name}] must be a table")
            try:
                covariates.append(_covariate_spec(name, entry))
            except ValidationError as error:
                raise CatalogueError(f"{path}: [covariates.{name}]: {error}") from None
        subgroups = []
        for name, entry in (raw.pop("subgroups", None) or {}).items():
            if not isinstance(entry, dict):
                raise CatalogueError(f"{path}: [subgroups.{name}] must be a table")
            try:
                subgroups.append(SubgroupSpec(name=name, **entry))
            except (ValidationError, TypeError) as error:
                raise CatalogueError(f"{path}: [subgroups.{name}]: {error}") from None
        joint = []
        for name, entry in (raw.pop("joint", None) or {}).items():
            if not isinstance(entry, dict):
                raise CatalogueError(f"{path}: [joint.{name}] must be a table")
            try:
                joint.append(JointGroupSpec(name=name, **entry))
            except (ValidationError, TypeError) as error:
                raise CatalogueError(f"{path}: [joint.{name}]: {error}") from None
        for name, entry in raw.items():
            if not isinstance(entry, dict):
                raise CatalogueError(f"{path}: [{name}] must be a table")
            try:
                measures[name] = MeasureSpec(name=name, **entry)
            except ValidationError as error:
                raise CatalogueError(f"{path}: [{name}]: {error}") from None
        if not measures:
            raise CatalogueError(f"{path}: no measures defined")
        try:
            return cls(
                measures=measures,
                covariates=tuple(covariates),
                subgroups=tuple(subgroups),
                joint=tuple(joint),
            )
        except ValidationError as error:
            raise CatalogueError(f"{path}: {error}") from None


def _covariate_spec(name: str, entry: dict) -> CovariateSpec:
    """A ``[covariates.<name>]`` table as a CovariateSpec: ``plausible`` is the
    plausible range and ``typical = [location, scale]`` its standardisation,
    as for measures."""
    entry = dict(entry)
    if "plausible" in entry:
        entry["plausible_range"] = tuple(entry.pop("plausible"))
    if "typical" in entry:
        entry["location"], entry["scale"] = entry.pop("typical")
    if "levels" in entry:
        entry["levels"] = tuple(entry["levels"])
    return CovariateSpec(name=name, **entry)
