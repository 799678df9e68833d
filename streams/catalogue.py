"""The measure catalogue: canonical units, conversions, plausibility, direction
of benefit, MCID and standardisation of every outcome measure.

Shipped as ``streams/measures.toml``; users point ``EFFICACY_MEASURES_FILE`` at
their own file with the same layout. A value in an accepted unit converts to
the canonical unit as ``canonical = value * scale + offset``.
"""

from __future__ import annotations

import math
import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from model.config import MeasureConfig, ModelConfig, Standardization

DEFAULT_CATALOGUE = Path(__file__).with_name("measures.toml")
Source = Literal["wearable", "lab", "pro"]


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

    @model_validator(mode="after")
    def _consistent(self) -> MeasureSpec:
        low, high = self.plausible
        if not low < high:
            raise ValueError(f"plausible must be [low, high] with low < high, got {self.plausible}")
        if self.typical[1] <= 0:
            raise ValueError("typical scale must be > 0")
        return self

    def to_canonical(self, value: float, unit: str) -> float:
        """The value in the canonical unit; UnknownUnit for a unit not listed."""
        if unit == self.unit:
            return value
        conversion = self.units.get(unit)
        if conversion is None:
            accepted = ", ".join([self.unit, *self.units])
            raise UnknownUnit(f"{self.name} accepts units {accepted}, not {unit!r}")
        return value * conversion.scale + conversion.offset

    def plausible_value(self, value: float) -> bool:
        low, high = self.plausible
        return math.isfinite(value) and low <= value <= high

    def measure_config(self) -> MeasureConfig:
        return MeasureConfig(
            name=self.name,
            unit=self.unit,
            direction=self.direction,
            mcid=self.mcid,
            plausible_range=self.plausible,
            weight=self.weight,
        )

    def model_config_for(
        self,
        *,
        time_origin_days: float,
        time_scale_days: float,
        half_life_days: float | None,
        recent_half_life_days: float | None = None,
    ) -> ModelConfig:
        """The streaming model of this measure. Time is in days since the Unix
        epoch (UTC), shifted to the programme's origin and scaled so that the time
        trend's prior means "per ``time_scale_days``". Standardisation is fixed
        by configuration so statistics stay comparable forever (they are stored
        standardised)."""
        location, scale = self.typical
        return ModelConfig(
            time_trend=True,
            cohort_level=True,
            half_life=half_life_days,
            recent_half_life=recent_half_life_days,
            standardization=Standardization(
                outcome_location=location,
                outcome_scale=scale,
                exposure_scale=1.0,
                time_location=time_origin_days,
                time_scale=time_scale_days,
            ),
        )


class Catalogue(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    measures: dict[str, MeasureSpec]

    def get(self, name: str) -> MeasureSpec:
        try:
            return self.measures[name]
        except KeyError:
            raise UnknownMeasure(name) from None

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
        for name, entry in raw.items():
            if not isinstance(entry, dict):
                raise CatalogueError(f"{path}: [{name}] must be a table")
            try:
                measures[name] = MeasureSpec(name=name, **entry)
            except ValidationError as error:
                raise CatalogueError(f"{path}: [{name}]: {error}") from None
        if not measures:
            raise CatalogueError(f"{path}: no measures defined")
        return cls(measures=measures)
