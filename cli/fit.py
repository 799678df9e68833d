"""``efficacy fit``: an offline fit of a CSV file, for backfills and
real-world-evidence analyses.

Reads one row per observation, fits the hierarchical model (model.offline) and
writes the population and per-patient results as JSON. Errors in the file are
reported with the column and row that caused them.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from model.config import MeasureConfig


#: Every family's effect scales (model.config.SCALES), for the --effect-scale choices.
SCALE_CHOICES = (
    ("difference",),
    ("odds_ratio", "risk_difference", "log_odds_ratio"),
    ("rate_ratio", "rate_difference", "log_rate_ratio"),
)


class InputError(ValueError):
    """A problem with the user's input file or flags; the message says which."""


def measure_of(args: argparse.Namespace) -> MeasureConfig:
    """The outcome's MCID, direction and unit: the flags, else those of the
    catalogue measure named by --measure (or by --outcome). Without either, the
    MCID must be given: a silent 0 would call every patient with any benefit a
    responder."""
    from pydantic import ValidationError

    from model.config import MeasureConfig
    from streams.catalogue import Catalogue, UnknownMeasure
    from streams.settings import Settings

    catalogue = Catalogue.load(Settings().measures_file)
    name = args.measure or args.outcome
    try:
        spec = catalogue.get(name)
    except UnknownMeasure:
        if args.measure:
            known = ", ".join(sorted(catalogue.measures))
            raise InputError(
                f"--measure {args.measure!r} is not in the catalogue ({known})"
            ) from None
        spec = None
    if args.mcid is None and spec is None:
        raise InputError(
            f"--mcid is required: {name!r} is not a catalogue measure, so there is no "
            "minimal clinically important difference to use (or name one with --measure)"
        )
    family = getattr(args, "family", None) or (spec.family if spec else "gaussian")
    scale = getattr(args, "effect_scale", None)
    if scale is None and spec is not None and spec.family == family:
        scale = spec.effect_scale
    try:
        return MeasureConfig(
            name=args.outcome,
            unit=args.unit if args.unit is not None else (spec.unit if spec else ""),
            direction=args.direction or (spec.direction if spec else "higher"),
            mcid=args.mcid if args.mcid is not None else spec.mcid,
            family=family,
            effect_scale=scale,
        )
    except ValidationError as error:  # e.g. a scale the family does not have
        raise InputError(f"--effect-scale/--mcid: {error.errors()[0]['msg']}") from None


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--input", required=True, type=Path, help="CSV file, one row per observation"
    )
    parser.add_argument("--patient", required=True, help="column with the patient id")
    parser.add_argument(
        "--exposure", required=True, help="column with the exposure (0/1 or a dose)"
    )
    parser.add_argument("--outcome", required=True, help="column with the outcome value")
    parser.add_argument(
        "--cohort",
        action="append",
        metavar="COL[,COL...]",
        help="column with the cohort (clinic, stratum); none: one cohort. Several columns "
        "(comma-separated, or the flag repeated) are several grouping levels, crossed or "
        "nested (clinic and genotype cluster): each level's groups shift the effect, with "
        "the level's own sd; the first column is the cohort of the output's patients",
    )
    parser.add_argument(
        "--time", help="column with the observation time; adds a population time trend"
    )
    parser.add_argument(
        "--covariates",
        metavar="COL,...",
        help="patient covariates (constant within a patient): each shifts the patient's "
        "expected effect (an effect modifier) and intercept; numeric columns per unit, "
        "others categorical (per level against the first, sorted)",
    )
    parser.add_argument(
        "--time-covariates",
        metavar="COL,...",
        help="numeric covariates that vary over time (a medication change, the season): "
        "population fixed effects next to the time trend",
    )
    parser.add_argument(
        "--smooth",
        action="append",
        default=[],
        metavar="COL",
        help="a numeric patient covariate whose effect is a smooth curve (a penalised cubic "
        "spline, knots at quantiles) instead of a straight line; repeat for several; implies "
        "--covariates COL",
    )
    parser.add_argument(
        "--daily-cycle",
        type=int,
        nargs="?",
        const=2,
        default=0,
        metavar="K",
        help="a daily cycle of the outcome: K Fourier harmonics of the reading's hour of day "
        "(default K: 2) as population fixed effects; the hour is the --time-of-day column, "
        "else the --time column read as days (midnight at whole days)",
    )
    parser.add_argument(
        "--time-of-day",
        metavar="COL",
        help="column with the reading's hour of day in [0, 24], for --daily-cycle",
    )
    parser.add_argument(
        "--measure",
        help="a measure of the catalogue (EFFICACY_MEASURES_FILE): its MCID, direction and "
        "unit are the defaults of --mcid, --direction and --unit (default: --outcome, when "
        "the catalogue has a measure of that name)",
    )
    parser.add_argument(
        "--mcid",
        type=float,
        help="minimal clinically important difference, outcome units; required unless "
        "the outcome is a catalogue measure",
    )
    parser.add_argument(
        "--direction",
        choices=["higher", "lower"],
        help="which direction of the outcome is a benefit (default: the catalogue "
        "measure's, else higher)",
    )
    parser.add_argument(
        "--min-exposed", type=int, default=3, help="observations with exposure before a call"
    )
    parser.add_argument(
        "--min-unexposed", type=int, default=3, help="observations without exposure before a call"
    )
    parser.add_argument(
        "--family",
        choices=["gaussian", "bernoulli", "poisson"],
        help="the outcome's distribution: gaussian (a measurement), bernoulli (0/1, e.g. "
        "symptom today), poisson (a count, e.g. rescue-inhaler uses); default: the catalogue "
        "measure's, else gaussian. Bernoulli and Poisson need a 0/1 exposure and no --time",
    )
    parser.add_argument(
        "--effect-scale",
        choices=sorted({scale for scales in SCALE_CHOICES for scale in scales}),
        help="scale of the effect and the MCID: difference (gaussian); odds_ratio (default), "
        "risk_difference, log_odds_ratio (bernoulli); rate_ratio (default), rate_difference, "
        "log_rate_ratio (poisson)",
    )
    parser.add_argument(
        "--offset",
        metavar="COL",
        help="poisson: column with each reading's exposure (person-time, > 0): counts are "
        "rates per unit of it",
    )
    parser.add_argument(
        "--joint",
        nargs="?",
        const="measure",
        metavar="COL",
        help="fit several measures jointly, their patients' effects correlated (model.joint): "
        "the file is long, COL (default: measure) names each row's measure and --outcome "
        "holds every measure's value. Reports each measure's population effect, the "
        "correlation of the effects across measures, their common factor (loadings, "
        "variance share) and every patient's effect on each; "
        "directions and units come from the catalogue (else higher is better). Takes "
        "--time, --cohort (one column: each cohort shifts every measure's effect, with "
        "each measure's own between-cohort sd), --seed, --output and the cache flags only",
    )
    parser.add_argument("--method", choices=["svi", "nuts"], default="svi")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--unit", help="unit of the outcome, for the output (default: the catalogue measure's)"
    )
    parser.add_argument("--output", type=Path, help="JSON file to write (default: standard output)")
    parser.add_argument(
        "--select",
        action="store_true",
        help="also compare model structures (complete, no and partial pooling, plus a cohort "
        "level per cohort column) by K-fold cross-validation over held-out patients",
    )
    parser.add_argument(
        "--cohort-columns",
        help="comma-separated cohort attributes to try as the cohort level with --select "
        "(default: the --cohort column, if any)",
    )
    parser.add_argument(
        "--folds", type=int, default=5, help="folds of the cross-validation (--select)"
    )
    cache = parser.add_mutually_exclusive_group()
    cache.add_argument(
        "--compilation-cache",
        type=Path,
        metavar="DIR",
        help="JAX's persistent compilation cache, where a fit finds what earlier ones "
        "compiled, and the traced programs in its exported/ (default: "
        "$EFFICACY_COMPILATION_CACHE_DIR if set, else $XDG_CACHE_HOME/living-efficacy/jax)",
    )
    cache.add_argument(
        "--no-compilation-cache",
        action="store_true",
        help="compile everything in this process, read and write no cache",
    )


def _numeric(rows: list[dict[str, str]], column: str, path: Path) -> np.ndarray:
    values = np.empty(len(rows))
    for line, row in enumerate(rows, start=2):  # line 1 is the header
        text = (row.get(column) or "").strip()
        try:
            value = float(text)
        except ValueError:
            raise InputError(
                f"{path}:{line}: column {column!r} must be numeric, got {text!r}"
            ) from None
        if not math.isfinite(value):
            raise InputError(f"{path}:{line}: column {column!r} is not finite ({text!r})")
        values[line - 2] = value
    return values


def _labels(rows: list[dict[str, str]], column: str, path: Path) -> list[str]:
    labels = []
    for line, row in enumerate(rows, start=2):
        text = (row.get(column) or "").strip()
        if not text:
            raise InputError(f"{path}:{line}: column {column!r} is empty")
        labels.append(text)
    return labels


def cohort_columns(args: argparse.Namespace) -> list[str]:
    """The --cohort columns in order: none, one, or several (comma-separated or
    the flag repeated); a column named twice counts once."""
    given = args.cohort if isinstance(args.cohort, list) else [args.cohort]
    return list(dict.fromkeys(name for text in given for name in _column_list(text)))


def covariate_columns(args: argparse.Namespace) -> list[str]:
    """The --covariates columns and then any --smooth column not among them."""
    names = _column_list(getattr(args, "covariates", None))
    return names + [name for name in getattr(args, "smooth", None) or [] if name not in names]


def read_table(args: argparse.Namespace) -> tuple[Any, list[str], list[str]]:
    """Parse the CSV into model Events plus the patient and cohort labels."""
    events, patients, cohort_labels, _ = read_table_with_levels(args)
    return events, patients, cohort_labels


def read_table_with_levels(
    args: argparse.Namespace,
) -> tuple[Any, list[str], list[str], list[list[str]]]:
    """read_table, plus the labels of every grouping level's groups (by index):
    the first --cohort column's (the cohorts; ["all"] without one), then each
    further --cohort column's, the Events' ``groups`` in that order."""
    from model.events import Events

    path: Path = args.input
    if not path.is_file():
        raise InputError(f"input file not found: {path}")
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        header = reader.fieldnames or []
        wanted = [
            args.patient,
            args.exposure,
            args.outcome,
            *cohort_columns(args),
            args.time,
            *covariate_columns(args),
            *_column_list(getattr(args, "time_covariates", None)),
            getattr(args, "offset", None),
            getattr(args, "time_of_day", None),
        ]
        missing = [c for c in wanted if c is not None and c not in header]
        if missing:
            raise InputError(
                f"{path}: missing column(s) {', '.join(map(repr, missing))}; "
                f"the file has {', '.join(map(repr, header)) or 'no header'}"
            )
        rows = list(reader)
    if not rows:
        raise InputError(f"{path}: no data rows")

    patient_labels = _labels(rows, args.patient, path)
    exposure = _numeric(rows, args.exposure, path)
    outcome = _numeric(rows, args.outcome, path)
    time = _numeric(rows, args.time, path) if args.time else np.zeros(len(rows))
    offset = _numeric(rows, args.offset, path) if getattr(args, "offset", None) else None
    if offset is not None and np.any(offset <= 0):
        line = int(np.flatnonzero(offset <= 0)[0]) + 2
        raise InputError(f"{path}:{line}: column {args.offset!r} (an exposure) must be > 0")

    patients = list(dict.fromkeys(patient_labels))
    patient_index = {p: i for i, p in enumerate(patients)}
    columns = cohort_columns(args)
    levels = [_patient_levels(rows, name, patient_labels, patients, path) for name in columns]
    if not levels:
        levels = [(np.zeros(len(patients), dtype=np.int64), ["all"])]
    cohort_of_patient, cohorts = levels[0]
    further = levels[1:]
    time_covariates = [
        _numeric(rows, name, path) for name in _column_list(getattr(args, "time_covariates", None))
    ]
    covariates, covariate_names = patient_covariates(rows, args, patients, path)
    events = Events(
        patient=np.array([patient_index[p] for p in patient_labels], dtype=np.int64),
        cohort_of_patient=cohort_of_patient,
        time=time,
        exposure=exposure,
        outcome=outcome,
        covariates=covariates,
        time_covariates=np.stack(time_covariates, axis=-1) if time_covariates else None,
        covariate_names=covariate_names,
        time_covariate_names=tuple(_column_list(getattr(args, "time_covariates", None))),
        groups=np.stack([index for index, _ in further], axis=-1) if further else None,
        group_names=tuple(columns[1:]),
        offset=offset,
    )
    labels = [cohorts] + [names for _, names in further]
    return events, patients, [cohorts[g] for g in cohort_of_patient], labels


def _patient_levels(
    rows: list[dict[str, str]],
    column: str,
    patient_labels: list[str],
    patients: list[str],
    path: Path,
) -> tuple[np.ndarray, list[str]]:
    """Each patient's group index under a grouping column, and the groups'
    labels (sorted); a patient must have one value."""
    labels = _labels(rows, column, path)
    names = sorted(set(labels))
    position = {name: g for g, name in enumerate(names)}
    index = {patient: i for i, patient in enumerate(patients)}
    group = np.full(len(patients), -1, dtype=np.int64)
    for patient, label in zip(patient_labels, labels, strict=True):
        i = index[patient]
        if group[i] not in (-1, position[label]):
            raise InputError(f"{path}: patient {patient!r} has more than one {column!r}")
        group[i] = position[label]
    return group, names


def _column_list(text: str | None) -> list[str]:
    return [name.strip() for name in (text or "").split(",") if name.strip()]


def patient_covariates(
    rows: list[dict[str, str]], args: argparse.Namespace, patients: list[str], path: Path
) -> tuple[np.ndarray | None, tuple[str, ...]]:
    """The --covariates design (P, q), natural units, categorical columns as
    indicators (model.covariates), and its column names; a patient whose value
    changes between rows, or a value that does not parse, is an error naming
    the patient."""
    from model.covariates import CovariateError, CovariateSpec, design_columns

    names = covariate_columns(args)
    if not names:
        return None, ()
    specs = []
    index = {patient: i for i, patient in enumerate(patients)}
    blocks = []
    for name in names:
        values: list[str | None] = [None] * len(patients)
        for line, row in enumerate(rows, start=2):
            patient, text = row[args.patient].strip(), (row.get(name) or "").strip()
            if not text:
                raise InputError(f"{path}:{line}: column {name!r} is empty (patient {patient!r})")
            i = index[patient]
            if values[i] not in (None, text):
                raise InputError(
                    f"{path}:{line}: patient {patient!r} has more than one {name!r} "
                    f"({values[i]!r}, {text!r}); --covariates must be constant within a "
                    "patient (use --time-covariates for one that changes)"
                )
            values[i] = text
        try:
            spec = CovariateSpec.infer(name, values)
            blocks.append(np.array([spec.encode(value) for value in values]))
        except CovariateError as error:
            raise InputError(f"{path}: {error}") from None
        specs.append(spec)
    return np.concatenate(blocks, axis=-1), design_columns(specs)


def smooth_design(args: argparse.Namespace, events: Any) -> Any:
    """The events with the --smooth splines and the --daily-cycle terms
    (model.smooth.add_smooth_terms); None without either."""
    from model.smooth import add_smooth_terms

    smooth = list(dict.fromkeys(getattr(args, "smooth", None) or []))
    harmonics = getattr(args, "daily_cycle", 0) or 0
    if not smooth and not harmonics:
        if getattr(args, "time_of_day", None):
            raise InputError("--time-of-day is only used with --daily-cycle")
        return None
    if harmonics < 0:
        raise InputError(f"--daily-cycle needs K >= 1 harmonics, got {harmonics}")
    hour, column = None, "hour"
    if harmonics:
        path: Path = args.input
        if args.time_of_day:
            with path.open(newline="") as handle:
                hour = _numeric(list(csv.DictReader(handle)), args.time_of_day, path)
            column = args.time_of_day
        elif not args.time:
            raise InputError(
                "--daily-cycle needs the hour of each reading: give --time-of-day COL (hours "
                "0-24) or --time COL (days, midnight at whole days)"
            )
    for name in smooth:
        if name not in events.covariate_names:  # a categorical one has name=level columns
            raise InputError(f"--smooth {name!r} must be a numeric column (it is categorical)")
    try:
        return add_smooth_terms(events, smooth, harmonics=harmonics, hour=hour, cycle_column=column)
    except ValueError as error:
        raise InputError(str(error)) from None


def cohort_attributes(args: argparse.Namespace, patients: list[str]) -> dict[str, np.ndarray]:
    """Cohort index of every patient under each attribute to try with --select:
    the --cohort-columns (or the --cohort column). A patient must have one value
    per attribute."""
    names = _column_list(args.cohort_columns) if args.cohort_columns else cohort_columns(args)
    if not names:
        return {}
    path: Path = args.input
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        missing = [name for name in names if name not in (reader.fieldnames or [])]
        if missing:
            raise InputError(f"{path}: missing cohort column(s) {', '.join(map(repr, missing))}")
        rows = list(reader)
    patient_labels = _labels(rows, args.patient, path)
    return {name: _patient_levels(rows, name, patient_labels, patients, path)[0] for name in names}


def run_selection(
    args: argparse.Namespace, events: Any, cohorts: dict[str, np.ndarray], say: Any
) -> dict[str, Any]:
    """Structure selection (model.selection) on the file's patients; prints the table."""
    from model.covariates import column_blocks
    from model.evidence import events_stats
    from model.offline import model_config_for
    from model.selection import format_table, select_structure

    config = model_config_for(events, time_trend=args.time is not None, cohort_level=False)
    stats = events_stats(events, config)
    say(f"structure selection: {args.folds}-fold cross-validation over patients")
    covariates = None
    if config.num_covariates:
        covariates = config.standardization.covariates(events.covariates)
    selection = select_structure(
        lambda _config: stats,  # Gram matrices depend only on time trend and scaling
        config,
        cohorts,
        num_folds=args.folds,
        seed=args.seed,
        progress=say,
        covariates=covariates,
        covariate_blocks=column_blocks(config.covariates),
    )
    selection.pop("pointwise")
    table = format_table(selection)
    print(table, file=sys.stdout if args.output else sys.stderr, flush=True)
    return selection


def check_family(args: argparse.Namespace, events: Any, family: str) -> None:
    """InputError, naming the first offending row, when the file does not fit the
    family: a Bernoulli outcome is 0 or 1 and a Poisson one a non-negative integer;
    both need an exposure of 0 or 1, no --time or --time-covariates, the SVI
    method and no --select; only Poisson takes --offset."""
    from model.families import invalid_outcomes

    path: Path = args.input
    if getattr(args, "offset", None) and family != "poisson":
        raise InputError(f"--offset is for poisson counts, not a {family} outcome")
    if family == "gaussian":
        return
    for flag, given in (
        ("--time", args.time),
        ("--time-covariates", getattr(args, "time_covariates", None)),
    ):
        if given:
            raise InputError(f"{flag}: a {family} outcome has no time trend or time covariates")
    if args.method != "svi" or getattr(args, "select", False):
        raise InputError(f"a {family} outcome is fitted with --method svi, without --select")
    bad, what = invalid_outcomes(events.outcome, family)
    if np.any(bad):
        first = int(np.flatnonzero(bad)[0])
        raise InputError(
            f"{path}:{first + 2}: column {args.outcome!r} must be {what} for a {family} "
            f"outcome, got {events.outcome[first]:g}"
        )
    exposure = np.asarray(events.exposure)
    if np.any((exposure != 0) & (exposure != 1)):
        first = int(np.flatnonzero((exposure != 0) & (exposure != 1))[0])
        raise InputError(
            f"{path}:{first + 2}: column {args.exposure!r} must be 0 or 1 for a {family} "
            f"outcome, got {exposure[first]:g}"
        )


def run(args: argparse.Namespace) -> int:
    from streams.compilation_cache import directory_from_env, enable_compilation_cache

    # Before anything compiles: JAX decides at its first compilation.
    cache_directory = None
    if not args.no_compilation_cache:
        cache_directory = enable_compilation_cache(args.compilation_cache or directory_from_env())

    from model.config import DecisionRule
    from model.exported import ExportCache
    from model.offline import fit_programme

    # The traced programs next to their compiles (JAX's cache leaves other files be):
    # a later fit of the same shapes neither traces nor lowers them (model.exported).
    export_cache = ExportCache.beside(cache_directory)

    def say(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    if args.joint:
        return run_joint(args, say)
    try:
        events, patients, _, level_labels = read_table_with_levels(args)
        cohorts = cohort_attributes(args, patients) if args.select else {}
        design = smooth_design(args, events)
    except InputError as error:
        say(f"efficacy fit: error: {error}")
        return 2
    level_names = cohort_columns(args) or ["cohort"]
    events, level_names, level_labels = identified_levels(
        design.events if design else events, level_names, level_labels, say
    )
    if design is not None:
        design = dataclasses.replace(design, events=events)
    cohort_of_patient = [level_labels[0][g] for g in events.cohort_of_patient]
    say(
        f"fitting {events.num_patients} patients, {events.num_cohorts} cohort(s), "
        f"{events.patient.size} observations with {args.method.upper()}"
    )
    try:
        measure = measure_of(args)
        check_family(args, events, measure.family)
    except InputError as error:
        say(f"efficacy fit: error: {error}")
        return 2
    result, _ = fit_programme(
        events,
        measure,
        method=args.method,
        seed=args.seed,
        time_trend=args.time is not None,
        cohort_level=events.num_cohorts > 1,
        rule=DecisionRule(min_exposed=args.min_exposed, min_unexposed=args.min_unexposed),
        progress=say,
        export_cache=export_cache,
        smooth=design,
    )
    if args.select:
        result["selection"] = run_selection(args, events, cohorts, say)
    for record, patient, cohort in zip(
        result["patients"], patients, cohort_of_patient, strict=True
    ):
        record["patient_id"] = patient
        record["cohort"] = cohort
    result["patients"] = [
        {"patient_id": r.pop("patient_id"), "cohort": r.pop("cohort"), **r}
        for r in result["patients"]
    ]
    if "cohorts" in result:  # by index from the fit (a cohort level: more than one cohort)
        for record, cohort in zip(result["cohorts"], level_labels[0], strict=True):
            record["cohort"] = cohort
    # "levels" only with several grouping levels
    for level, name, labels in zip(
        result.get("levels", []), level_names, level_labels, strict=False
    ):
        level["level"] = name
        for group, label in zip(level["groups"], labels, strict=False):  # none with NUTS
            group["group"] = label
    text = json.dumps(result, indent=2)
    if args.output:
        args.output.write_text(text + "\n")
        effect = result["population"]["effect"]
        say(
            f"population effect {effect['mean']:.3f} (90% interval {effect['q05']:.3f} to "
            f"{effect['q95']:.3f}); wrote {args.output}"
        )
        for row in result["coefficients"]:
            modifier = row["effect"]
            say(
                f"  effect per unit of {row['covariate']}: {modifier['mean']:+.3f} "
                f"(90% interval {modifier['q05']:+.3f} to {modifier['q95']:+.3f})"
            )
        for line in curve_lines(result):
            say(line)
        for level in result.get("levels", []):
            sd = level["effect_sd"]
            say(
                f"  effect sd between {level['level']} groups: {sd['mean']:.3f} "
                f"(90% interval {sd['q05']:.3f} to {sd['q95']:.3f})"
            )
    else:
        print(text)
    return 0


#: Options of a single-measure fit that ``--joint`` does not take, with their
#: defaults (argparse's): any other value is an error, not silently ignored.
JOINT_UNSUPPORTED = {
    "covariates": None,
    "time_covariates": None,
    "smooth": [],
    "daily_cycle": 0,
    "time_of_day": None,
    "measure": None,
    "mcid": None,
    "direction": None,
    "unit": None,
    "family": None,
    "effect_scale": None,
    "offset": None,
    "method": "svi",
    "select": False,
    "cohort_columns": None,
}


def joint_measures(
    args: argparse.Namespace,
) -> tuple[Any, list[str], list[Any], list[Any], list[str]]:
    """The long CSV split by the --joint column: all rows' Events, the patient
    labels, one Events per measure (patients indexed alike, in order of first
    appearance, each patient's cohort under the --cohort column as a
    single-measure fit reads it), each measure's MeasureConfig (the catalogue's
    direction and unit when it knows the name, else higher is better; the MCID
    is not used) and the cohorts' labels by index (["all"] without --cohort)."""
    from model.config import MeasureConfig
    from model.events import Events
    from streams.catalogue import Catalogue, UnknownMeasure
    from streams.settings import Settings

    given = [
        f"--{name.replace('_', '-')}"
        for name, default in JOINT_UNSUPPORTED.items()
        if getattr(args, name, default) != default
    ]
    if given:
        raise InputError(
            f"--joint does not take {', '.join(given)}: the joint fit here has a cohort "
            "level (--cohort, one column) but no further grouping levels, covariates or "
            "smooth terms, fits Gaussian measures by SVI, and reads each "
            "measure's direction and unit from the catalogue"
        )
    if len(cohort_columns(args)) > 1:
        raise InputError(
            f"--joint takes one --cohort column, got {', '.join(cohort_columns(args))}: "
            "the joint model has a cohort level but no further grouping levels"
        )
    path: Path = args.input
    events, patients, _, (cohorts,) = read_table_with_levels(args)
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        if args.joint not in (reader.fieldnames or []):
            raise InputError(f"{path}: missing the --joint column {args.joint!r}")
        labels = _labels(list(reader), args.joint, path)
    names = list(dict.fromkeys(labels))
    if not 2 <= len(names) <= 6:
        raise InputError(f"{path}: --joint needs 2-6 measures in {args.joint!r}, found {names}")
    catalogue = Catalogue.load(Settings().measures_file)
    label_array = np.asarray(labels)
    per_measure, configs = [], []
    for name in names:
        rows = label_array == name
        per_measure.append(
            Events(
                events.patient[rows],
                events.cohort_of_patient,
                events.time[rows],
                events.exposure[rows],
                events.outcome[rows],
            )
        )
        try:
            spec = catalogue.get(name)
        except UnknownMeasure:
            spec = None
        configs.append(
            MeasureConfig(
                name=name,
                unit=spec.unit if spec else "",
                direction=spec.direction if spec else "higher",
                mcid=spec.mcid if spec else 0.0,
            )
        )
    return events, patients, per_measure, configs, cohorts


def run_joint(args: argparse.Namespace, say: Any) -> int:
    """``efficacy fit --joint``: the measures of a long CSV fitted jointly."""
    from model.joint_offline import fit_joint_programme

    try:
        events, patients, per_measure, measures, cohorts = joint_measures(args)
    except InputError as error:
        say(f"efficacy fit: error: {error}")
        return 2
    # A cohort level as a single-measure fit has one: with more than one cohort.
    cohort_level = len(cohorts) > 1
    if cohort_columns(args) and not cohort_level:
        say(f"--cohort column {cohort_columns(args)[0]!r} has a single group: no cohort level")
    result = fit_joint_programme(
        per_measure,
        measures,
        time_trend=args.time is not None,
        cohort_level=cohort_level,
        seed=args.seed,
        progress=say,
    )
    for record, label in zip(result.get("cohorts", []), cohorts, strict=False):
        record["cohort"] = label  # by index from the fit (a cohort level: more than one)
    labelled = bool(cohort_columns(args))  # each patient's cohort, as a single-measure fit's
    result["patients"] = [
        {
            "patient_id": patient,
            **({"cohort": cohorts[g]} if labelled else {}),
            **record,
        }
        for patient, g, record in zip(
            patients, events.cohort_of_patient, result["patients"], strict=True
        )
    ]
    text = json.dumps(result, indent=2)
    if not args.output:
        print(text)
        return 0
    args.output.write_text(text + "\n")
    for row in result["measures"]:
        effect = row["effect"]
        say(
            f"{row['measure']}: population effect {effect['mean']:.3f} (90% interval "
            f"{effect['q05']:.3f} to {effect['q95']:.3f})"
        )
    correlation = result["effect_correlation"]
    names = correlation["measures"]
    for j in range(len(names)):
        for k in range(j + 1, len(names)):
            say(
                f"  correlation of effects {names[j]} ~ {names[k]}: "
                f"{correlation['mean'][j][k]:+.2f} (90% interval {correlation['q05'][j][k]:+.2f} "
                f"to {correlation['q95'][j][k]:+.2f})"
            )
    factor = result["effect_factor"]
    share = factor["variance_share"]
    loadings = ", ".join(
        f"{name} {mean:+.2f} ({low:+.2f} to {high:+.2f})"
        for name, mean, low, high in zip(
            names, *(factor["loadings"][k] for k in ("mean", "q05", "q95")), strict=True
        )
    )
    say(
        f"  one common factor carries {share['mean']:.0%} of the benefits' between-patient "
        f"variance (90% interval {share['q05']:.0%} to {share['q95']:.0%}); loadings {loadings}"
    )
    for row in result["measures"] if cohort_level else []:
        sd = row["effect_sd_cohorts"]
        say(
            f"  {row['measure']}: effect sd between {len(cohorts)} cohorts {sd['mean']:.3f} "
            f"(90% interval {sd['q05']:.3f} to {sd['q95']:.3f})"
        )
    say(f"wrote {args.output}")
    return 0


def curve_lines(result: dict[str, Any], points: int = 5) -> list[str]:
    """A few lines on the fitted curves: each smooth covariate's expected effect
    at ``points`` values across its range, and the daily cycle's peak and trough."""
    lines = []
    for curve in result.get("curves", []):
        grid, effect = curve["grid"], curve["effect"]
        picks = np.linspace(0, len(grid) - 1, points).round().astype(int)
        values = ", ".join(
            f"{grid[k]:.4g}: {effect['mean'][k]:+.2f} [{effect['q05'][k]:+.2f}, "
            f"{effect['q95'][k]:+.2f}]"
            for k in picks
        )
        lines.append(f"  effect by {curve['covariate']} (90% band): {values}")
    cycle = result.get("daily_cycle")
    if cycle:
        mean = np.asarray(cycle["mean"])
        high, low = int(mean.argmax()), int(mean.argmin())
        lines.append(
            f"  daily cycle: peak {mean[high]:+.2f} at {cycle['hour'][high]:.1f} h "
            f"[{cycle['q05'][high]:+.2f}, {cycle['q95'][high]:+.2f}], trough {mean[low]:+.2f} "
            f"at {cycle['hour'][low]:.1f} h [{cycle['q05'][low]:+.2f}, {cycle['q95'][low]:+.2f}]"
        )
    return lines


def identified_levels(
    events: Any, names: list[str], labels: list[list[str]], say: Any
) -> tuple[Any, list[str], list[list[str]]]:
    """The grouping levels with at least two groups (a level of one group is not
    identified: it is dropped, with a message). The first kept level becomes the
    cohort level; without any, the first column stays, as one cohort."""
    import dataclasses

    columns = [np.asarray(events.cohort_of_patient)]
    if events.groups is not None:
        columns.extend(np.asarray(events.groups).T)
    keep = [level for level, label in enumerate(labels) if len(label) > 1]
    if len(labels) > 1:
        for level in sorted(set(range(len(labels))) - set(keep)):
            say(f"--cohort column {names[level]!r} has a single group: not a level of the model")
    if not keep:
        return dataclasses.replace(events, groups=None, group_names=()), names[:1], labels[:1]
    further = [columns[level] for level in keep[1:]]
    events = dataclasses.replace(
        events,
        cohort_of_patient=columns[keep[0]],
        groups=np.stack(further, axis=-1) if further else None,
        group_names=tuple(names[level] for level in keep[1:]),
    )
    return events, [names[level] for level in keep], [labels[level] for level in keep]
