"""``efficacy report``: a self-contained HTML report of an ``efficacy fit``
result or of what the pipeline published on its topics.

Per measure: the population effect and the cohort effects as a forest plot,
the fitted curves of a fit with smooth terms,
every patient's effect as a forest plot, the calls (over time, from the
topics), the drift statistics of the population posterior (topics), and per
patient the readings over time with the exposure periods shaded beside the
patient's effect posterior against the population's.

Three parts: ``from_fit`` and ``from_topics`` gather a ``Report`` (the latter
reads the topics with the deployment's settings), ``render`` turns a Report
into one HTML string (hand-written SVG, no scripts, no network resources), and
``run`` is the command. Intervals are the 90% credible intervals the fit and
the scores carry.
"""

from __future__ import annotations

import argparse
import asyncio
import html
import json
import math
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

CALLS = ("responder", "non_responder", "uncertain", "insufficient_data")
CALL_COLOURS = {
    "responder": "#1a9850",
    "non_responder": "#d73027",
    "uncertain": "#7f7f7f",
    "insufficient_data": "#c7b98f",
}
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

EXAMPLE = """\
examples:
  efficacy fit --input tests/data/sleepstudy/sleepstudy.csv --patient Subject \\
      --exposure Days --outcome Reaction --direction lower --mcid 5 --output fit.json
  efficacy report --fit fit.json --input tests/data/sleepstudy/sleepstudy.csv \\
      --patient Subject --exposure Days --outcome Reaction --output sleepstudy.html
  efficacy report --measure resting_heart_rate --max-patients 12 --output programme.html
"""


# --- what a report shows ---------------------------------------------------------


@dataclass(frozen=True)
class Estimate:
    """A posterior summary: mean and the 90% credible interval."""

    mean: float
    lower: float
    upper: float


@dataclass(frozen=True)
class PatientPanel:
    patient_id: str
    cohort: str
    effect: Estimate | None
    call: str | None
    p_benefit_ge_mcid: float | None
    readings: list[tuple[float, float]] = field(default_factory=list)
    #: (start, end, dose) of every period with exposure > 0
    exposure: list[tuple[float, float, float]] = field(default_factory=list)


@dataclass(frozen=True)
class DriftPoint:
    version: int
    time: float | None
    statistics: dict[str, float]
    detected: bool
    kinds: list[str]


@dataclass(frozen=True)
class Curve:
    """A fitted curve (model.smooth.curve_summaries): ``mean`` and its 90% band
    ``lower``..``upper`` at every ``x``; ``kind`` names its plot (css class)."""

    title: str
    x_label: str
    y_label: str
    kind: str
    x: list[float]
    mean: list[float]
    lower: list[float]
    upper: list[float]


@dataclass
class MeasureReport:
    name: str
    unit: str
    direction: str
    mcid: float
    population: Estimate | None
    cohorts: list[tuple[str, Estimate]]
    patients: list[PatientPanel]
    #: (time, calls by kind) after every change; one entry for a fit
    calls: list[tuple[float, dict[str, int]]]
    drift: list[DriftPoint]
    drift_alerts: list[dict]
    shown_patients: list[str]
    facts: list[tuple[str, str]] = field(default_factory=list)
    #: a smooth fit's curves: each smooth covariate's expected effect, the daily cycle
    curves: list[Curve] = field(default_factory=list)


@dataclass
class Report:
    title: str
    source: str
    #: "date": times are days since the Unix epoch, shown as dates; else a label
    time_axis: str
    measures: list[MeasureReport]


# --- the command ---------------------------------------------------------------------


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EXAMPLE
    parser.add_argument(
        "--output", type=Path, default=Path("efficacy-report.html"), help="HTML file to write"
    )
    parser.add_argument(
        "--fit",
        type=Path,
        help="an `efficacy fit` JSON result; without it the report reads the topics "
        "(broker, topic prefix and catalogue from the worker's settings)",
    )
    fit = parser.add_argument_group(
        "the fitted CSV (with --fit: the readings per patient; same columns as `efficacy fit`)"
    )
    fit.add_argument("--input", type=Path, help="the CSV the fit was made from")
    fit.add_argument("--patient", help="column with the patient id")
    fit.add_argument("--exposure", help="column with the exposure")
    fit.add_argument("--outcome", help="column with the outcome value")
    fit.add_argument("--time", help="column with the observation time (default: row order)")
    topics = parser.add_argument_group("reading the topics (without --fit)")
    topics.add_argument("--measure", action="append", help="only this measure (repeatable)")
    topics.add_argument(
        "--seconds", type=float, default=60.0, help="give up reading the topics after this long"
    )
    parser.add_argument(
        "--show", action="append", metavar="PATIENT", help="a patient to draw (repeatable)"
    )
    parser.add_argument(
        "--max-patients",
        type=int,
        default=24,
        help="patients drawn per measure without --show (the first by id)",
    )
    parser.add_argument("--title", help="the report's title (default: from the source)")


def run(args: argparse.Namespace) -> int:
    def say(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    if args.fit:
        columns = [args.patient, args.exposure, args.outcome]
        if args.input and not all(columns):
            say("efficacy report: error: --input needs --patient, --exposure and --outcome")
            return 2
        try:
            result = json.loads(args.fit.read_text())
        except (OSError, ValueError) as error:
            say(f"efficacy report: error: cannot read the fit {args.fit}: {error}")
            return 2
        table = None
        if args.input:
            from cli.fit import InputError, read_table

            table_args = argparse.Namespace(
                input=args.input,
                patient=args.patient,
                exposure=args.exposure,
                outcome=args.outcome,
                cohort=None,
                time=args.time,
            )
            try:
                table = read_table(table_args)
            except InputError as error:
                say(f"efficacy report: error: {error}")
                return 2
        report = from_fit(
            result,
            table,
            time_column=args.time,
            show=args.show,
            max_patients=args.max_patients,
            source=f"efficacy fit result {args.fit.name}"
            + (f" of {args.input.name}" if args.input else ""),
        )
    else:
        from streams.settings import Settings

        settings = Settings()
        try:
            report = asyncio.run(
                from_topics(
                    settings,
                    measures=args.measure,
                    show=args.show,
                    max_patients=args.max_patients,
                    timeout=args.seconds,
                )
            )
        except TimeoutError as error:
            say(f"efficacy report: error: {error} on {settings.bootstrap_servers}")
            return 1
        if not report.measures:
            say("efficacy report: error: no population posterior or scores on the topics yet")
            return 1
    if args.title:
        report.title = args.title
    args.output.write_text(render(report))
    drawn = sum(len(m.patients) for m in report.measures)
    say(f"wrote {args.output}: {len(report.measures)} measure(s), {drawn} patient panels")
    return 0


# --- gathering: an `efficacy fit` result ---------------------------------------------


def _estimate(summary: dict | None) -> Estimate | None:
    if not summary:
        return None
    lower = summary.get("q05", summary.get("lower"))
    upper = summary.get("q95", summary.get("upper"))
    return Estimate(float(summary["mean"]), float(lower), float(upper))


def _chosen(ids: list[str], show: list[str] | None, max_patients: int) -> list[str]:
    if show:
        return [p for p in show if p in set(ids)]
    return sorted(ids, key=_natural)[:max_patients]


def _natural(text: str) -> tuple:
    """Sort key: patient-2 before patient-10."""
    digits = "".join(c if c.isdigit() else " " for c in text).split()
    return (len(digits[-1]) if digits else 0, text)


def exposure_spans(times: np.ndarray, doses: np.ndarray) -> list[tuple[float, float, float]]:
    """Periods of exposure > 0 from per-observation exposures: each observation's
    dose holds from its time to the next observation's (the last one's for half
    the median spacing)."""
    if times.size == 0:
        return []
    order = np.argsort(times, kind="stable")
    t, d = times[order], doses[order]
    gaps = np.diff(t)
    tail = float(np.median(gaps)) / 2 if gaps.size and np.median(gaps) > 0 else 0.5
    ends = np.append(t[1:], t[-1] + tail)
    spans: list[tuple[float, float, float]] = []
    for start, end, dose in zip(t, ends, d, strict=True):
        if dose <= 0:
            continue
        if spans and spans[-1][1] == start and spans[-1][2] == dose:
            spans[-1] = (spans[-1][0], float(end), float(dose))
        else:
            spans.append((float(start), float(end), float(dose)))
    return spans


def from_fit(
    result: dict,
    table: tuple[Any, list[str], list[str]] | None = None,
    *,
    time_column: str | None = None,
    show: list[str] | None = None,
    max_patients: int = 24,
    source: str = "efficacy fit",
) -> Report:
    """A Report of an ``efficacy fit`` result; ``table`` (fit_command.read_table
    of the fitted CSV) adds every drawn patient's readings and exposure."""
    measure = result["measure"]
    population = result["population"]
    ids = [p["patient_id"] for p in result["patients"]]
    chosen = _chosen(ids, show, max_patients)
    readings: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    if table is not None:
        events, labels, _ = table
        for index, label in enumerate(labels):
            mine = events.patient == index
            time = events.time[mine] if time_column else np.arange(mine.sum(), dtype=float)
            readings[label] = (time, events.outcome[mine], events.exposure[mine])
    panels = []
    by_id = {p["patient_id"]: p for p in result["patients"]}
    for patient_id in chosen:
        record = by_id[patient_id]
        time, outcome, exposure = readings.get(patient_id, (np.array([]),) * 3)
        panels.append(
            PatientPanel(
                patient_id=patient_id,
                cohort=str(record.get("cohort", "")),
                effect=_estimate(record["effect"]),
                call=record.get("classification"),
                p_benefit_ge_mcid=record.get("p_benefit_ge_mcid"),
                readings=list(zip(time.tolist(), outcome.tolist(), strict=True)),
                exposure=exposure_spans(time, exposure),
            )
        )
    counts = {call: 0 for call in CALLS}
    for record in result["patients"]:
        counts[record["classification"]] = counts.get(record["classification"], 0) + 1
    cohorts = [(c["cohort"], _estimate(c["effect"])) for c in result.get("cohorts", [])]
    diagnostics = result.get("diagnostics", {})
    facts = [
        (name.replace("_", " "), _fact(value))
        for name, value in diagnostics.items()
        if isinstance(value, int | float | str | bool)
    ]
    for name in ("intercept", "sigma", "effect_sd_patients", "effect_sd_cohorts", "time_trend"):
        estimate = _estimate(population.get(name))
        if estimate:
            facts.append((name.replace("_", " "), _interval_text(estimate)))
    report_measure = MeasureReport(
        name=measure["name"],
        unit=measure.get("unit", ""),
        direction=measure["direction"],
        mcid=float(measure["mcid"]),
        population=_estimate(population["effect"]),
        cohorts=[(name, estimate) for name, estimate in cohorts if estimate],
        patients=panels,
        calls=[(0.0, counts)],
        drift=[],
        drift_alerts=[],
        shown_patients=ids,
        facts=facts,
        curves=fitted_curves(result, measure.get("unit", "")),
    )
    return Report(
        title=f"Efficacy report: {measure['name']}",
        source=source,
        time_axis=time_column or "observation",
        measures=[report_measure],
    )


def fitted_curves(result: dict, unit: str) -> list[Curve]:
    """The curves of a fit with smooth terms (``curves`` and ``daily_cycle`` of
    an ``efficacy fit --smooth COL --daily-cycle K`` result, or of a smooth
    measure's PopulationPosterior: the same shape); none without."""
    curves = [
        Curve(
            title=f"Expected effect by {curve['covariate']}",
            x_label=curve["covariate"],
            y_label="effect per unit exposure",
            kind=f"curve-effect-{curve['covariate']}",
            x=curve["grid"],
            mean=curve["effect"]["mean"],
            lower=curve["effect"]["q05"],
            upper=curve["effect"]["q95"],
        )
        for curve in result.get("curves", [])
    ]
    cycle = result.get("daily_cycle")
    if cycle:
        curves.append(
            Curve(
                title="Daily cycle",
                x_label="hour of day",
                y_label="shift from the day's mean",
                kind="curve-daily-cycle",
                x=cycle["hour"],
                mean=cycle["mean"],
                lower=cycle["q05"],
                upper=cycle["q95"],
            )
        )
    return curves


def _fact(value: Any) -> str:
    if isinstance(value, float):
        return number(value)
    return str(value)


# --- gathering: the topics -----------------------------------------------------------


async def read_topics(settings: Any, names: list[str], timeout: float) -> dict[str, list]:
    """Every record of the topics ``names`` (without the prefix) up to their end
    offsets as of the call, by name; topics that do not exist are empty."""
    import time

    from aiokafka import AIOKafkaConsumer, TopicPartition

    from streams.kafka_options import aiokafka_options

    consumer = AIOKafkaConsumer(
        **aiokafka_options(settings), enable_auto_commit=False, metadata_max_age_ms=500
    )
    await consumer.start()
    out: dict[str, list] = {name: [] for name in names}
    try:
        listed = await consumer.topics()
        wanted = {settings.topic(name): name for name in names}
        present = [t for t in wanted if t in listed]
        deadline = time.monotonic() + timeout
        tps = []
        while not tps or any(not consumer.partitions_for_topic(t) for t in present):
            if time.monotonic() > deadline:
                raise TimeoutError(f"no partitions for {present}")
            tps = [
                TopicPartition(t, p)
                for t in present
                for p in consumer.partitions_for_topic(t) or ()
            ]
            if any(not consumer.partitions_for_topic(t) for t in present):
                await consumer.topics()
                await asyncio.sleep(0.2)
        if not tps:
            return out
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        end = await consumer.end_offsets(tps)
        while [tp for tp in tps if await consumer.position(tp) < end[tp]]:
            if time.monotonic() > deadline:
                raise TimeoutError(f"reading the topics took longer than {timeout:g} s")
            batches = await consumer.getmany(timeout_ms=500)
            for tp, records in batches.items():
                out[wanted[tp.topic]].extend(r for r in records if r.offset < end[tp])
        return out
    finally:
        await consumer.stop()


def days(moment: datetime) -> float:
    return (moment - EPOCH).total_seconds() / 86400.0


def _parse_time(text: str) -> float:
    return days(datetime.fromisoformat(text.replace("Z", "+00:00")))


async def from_topics(
    settings: Any,
    *,
    measures: list[str] | None = None,
    show: list[str] | None = None,
    max_patients: int = 24,
    timeout: float = 60.0,
) -> Report:
    """A Report of what the pipeline published (scores, population posteriors,
    alerts) and of the readings and exposures on the source topics."""
    names = ["enrollments", "wearables", "labs", "pros", "scores", "population-posterior"]
    records = await read_topics(settings, [*names, "alerts"], timeout)
    return report_from_records(settings, records, measures=measures, show=show,
                               max_patients=max_patients)  # fmt: skip


def report_from_records(
    settings: Any,
    records: dict[str, list],
    *,
    measures: list[str] | None = None,
    show: list[str] | None = None,
    max_patients: int = 24,
) -> Report:
    """The topics' records (by topic name without prefix; objects with ``key``,
    ``value``, ``topic``, ``partition``, ``offset``) as a Report."""
    from streams.catalogue import Catalogue
    from streams.schemas import Enrollment, EnrollmentRecord, Observation, Origin
    from streams.validation import Rejected, validate_record

    catalogue = Catalogue.load(settings.measures_file)
    # Readings as the worker takes them (canonical unit, plausible), whatever their age.
    lenient = settings.model_copy(update={"max_age_days": 36500.0, "max_future_days": 36500.0})
    readings: dict[tuple[str, str], dict[str, tuple[float, float]]] = defaultdict(dict)
    exposure_events: dict[str, dict[str, tuple[float, float]]] = defaultdict(dict)
    for source in ("enrollments", "wearables", "labs", "pros"):
        for record in records.get(source, []):
            origin = Origin(topic=record.topic, partition=record.partition, offset=record.offset)
            try:
                event = validate_record(
                    source, record.key, record.value, origin, catalogue, lenient
                )
            except Rejected:
                continue
            if isinstance(event, Observation):
                when = days(event.event_time)
                readings[(event.patient_id, event.measure)][event.event_id] = (when, event.value)
            elif isinstance(event, EnrollmentRecord):
                inner = event.event
                dose = float(inner.exposed) if isinstance(inner, Enrollment) else inner.exposure
                exposure_events[inner.patient_id][inner.event_id] = (days(inner.event_time), dose)

    scores = sorted(
        (json.loads(r.value) for r in records.get("scores", [])),
        key=lambda s: s["event_time"],
    )
    posteriors = sorted(
        (json.loads(r.value) for r in records.get("population-posterior", [])),
        key=lambda p: p["version"],
    )
    alerts = [json.loads(r.value) for r in records.get("alerts", [])]
    names = sorted(
        {m["measure"] for s in scores for m in s["measures"]} | {p["measure"] for p in posteriors}
    )
    if measures:
        names = [n for n in names if n in measures]
    last_time = max((t for by_id in readings.values() for t, _ in by_id.values()), default=0.0)

    report_measures = []
    for name in names:
        spec = catalogue.measures.get(name)
        latest: dict[str, tuple[dict, dict]] = {}
        current: dict[str, str] = {}
        calls: list[tuple[float, dict[str, int]]] = []
        for score in scores:
            for m in score["measures"]:
                if m["measure"] != name:
                    continue
                latest[score["patient_id"]] = (score, m)
                if current.get(score["patient_id"]) != m["classification"]:
                    current[score["patient_id"]] = m["classification"]
                    counts = {call: 0 for call in CALLS}
                    for call in current.values():
                        counts[call] += 1
                    calls.append((_parse_time(score["event_time"]), counts))
        mine = [p for p in posteriors if p["measure"] == name]
        population = cohorts = None
        if mine:
            population = _estimate(mine[-1]["summary"].get("effect"))
            cohorts = cohort_effects(mine[-1])
        ids = sorted(latest)
        panels = []
        for patient_id in _chosen(ids, show, max_patients):
            score, m = latest[patient_id]
            points = sorted(readings.get((patient_id, name), {}).values())
            changes = sorted(exposure_events.get(patient_id, {}).values())
            end = max([last_time, *(t for t, _ in points)])
            panels.append(
                PatientPanel(
                    patient_id=patient_id,
                    cohort=score["cohort"],
                    effect=_estimate(m["effect"]),
                    call=m["classification"],
                    p_benefit_ge_mcid=m["p_benefit_ge_mcid"],
                    readings=points,
                    exposure=change_spans(changes, end),
                )
            )
        drift = [
            DriftPoint(
                version=p["version"],
                time=_parse_time(p["event_time"]),
                statistics=p.get("drift", {}),
                detected=p.get("drift_detected", False),
                kinds=p.get("drift_kinds", []),
            )
            for p in mine
        ]
        facts = []
        if mine:
            last = mine[-1]
            facts = [
                ("posterior version", str(last["version"])),
                ("patients in the fit", str(last["num_patients"])),
                ("observations in the fit", number(last["num_observations"])),
                ("converged", str(last["converged"])),
                ("posterior published", last["event_time"][:19].replace("T", " ")),
            ]
        report_measures.append(
            MeasureReport(
                name=name,
                unit=spec.unit if spec else (next(iter(latest.values()))[1]["unit"]),
                direction=spec.direction if spec else "higher",
                mcid=spec.mcid if spec else 0.0,
                population=population,
                cohorts=cohorts or [],
                patients=panels,
                calls=calls,
                drift=drift,
                drift_alerts=[a for a in alerts if a["kind"] == "drift" and a["measure"] == name],
                shown_patients=ids,
                facts=facts,
                # a smooth measure's posterior carries its curves as a fit's JSON does
                curves=fitted_curves(mine[-1], spec.unit if spec else "") if mine else [],
            )
        )
    return Report(
        title="Efficacy report",
        source=f"topics {settings.topic_prefix}* on {settings.bootstrap_servers}",
        time_axis="date",
        measures=report_measures,
    )


def change_spans(
    changes: list[tuple[float, float]], end: float
) -> list[tuple[float, float, float]]:
    """Periods of exposure > 0 from (time, exposure) changes, the last one open until ``end``."""
    spans = []
    for (start, dose), following in zip(changes, [*changes[1:], (end, 0.0)], strict=True):
        stop = max(following[0], start)
        if dose > 0 and stop > start:
            spans.append((start, stop, dose))
    return spans


def cohort_effects(posterior: dict) -> list[tuple[str, Estimate]]:
    """Every cohort's effect in raw units from a PopulationPosterior (its draws
    of θ and each cohort's deviation under each draw), as ``efficacy fit``
    computes them (model.offline.cohort_effects)."""
    from model.config import Standardization
    from model.offline import cohort_effects as summarize

    names = posterior.get("cohorts") or []
    if not names:
        return []
    summaries = summarize(
        np.asarray(posterior["draws"]["mu"])[:, 1],
        np.asarray(posterior["cohort_mean"]),
        np.asarray(posterior["cohort_var"]),
        Standardization(**posterior["standardization"]),
    )
    return [(name, _estimate(summary)) for name, summary in zip(names, summaries, strict=True)]


# --- rendering -----------------------------------------------------------------------


def number(value: float | None) -> str:
    """Four significant digits, no exponent (the page's numbers)."""
    if value is None or not math.isfinite(value):
        return "n/a"
    if value == 0:
        return "0"
    digits = 3 - math.floor(math.log10(abs(value)))
    return f"{value:.{min(max(digits, 0), 6)}f}"


def _interval_text(estimate: Estimate) -> str:
    return f"{number(estimate.mean)} (90% {number(estimate.lower)} to {number(estimate.upper)})"


def tick_text(value: float) -> str:
    """A tick's label: as short as the tick (ticks are round numbers)."""
    return f"{round(value, 9):g}"


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    if not (math.isfinite(low) and math.isfinite(high)):
        return []
    if high <= low:
        low, high = low - 1, high + 1
    raw = (high - low) / count
    step = 10 ** math.floor(math.log10(raw))
    for m in (1, 2, 2.5, 5, 10):
        if raw <= step * m:
            step *= m
            break
    first = math.ceil(low / step) * step
    return [first + i * step for i in range(int((high - first) / step + 1e-9) + 1)]


class Scale:
    def __init__(self, low: float, high: float, start: float, stop: float) -> None:
        if high <= low:
            low, high = low - 1.0, high + 1.0
        self.low, self.high, self.start, self.stop = low, high, start, stop

    def __call__(self, value: float) -> float:
        return self.start + (value - self.low) / (self.high - self.low) * (self.stop - self.start)


def _padded(values: list[float], fraction: float = 0.05) -> tuple[float, float]:
    low, high = min(values), max(values)
    pad = (high - low) * fraction or max(abs(low) * 0.1, 1.0)
    return low - pad, high + pad


def _esc(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _time_label(value: float, axis: str) -> str:
    if axis == "date":
        return (EPOCH + timedelta(days=value)).strftime("%Y-%m-%d")
    return tick_text(value)


def _svg(kind: str, width: int, height: int, label: str, body: list[str]) -> str:
    return (
        f'<svg class="plot {kind}" role="img" aria-label="{_esc(label)}" '
        f'xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}">' + "".join(body) + "</svg>"
    )


def _axis_x(scale: Scale, y: float, ticks: list[float], text: Any) -> list[str]:
    out = [f'<line x1="{scale.start:.1f}" x2="{scale.stop:.1f}" y1="{y}" y2="{y}" class="axis"/>']
    for tick in ticks:
        x = scale(tick)
        out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{y}" y2="{y + 4}" class="axis"/>')
        out.append(f'<text x="{x:.1f}" y="{y + 15}" class="tick" text-anchor="middle">'
                   f"{_esc(text(tick))}</text>")  # fmt: skip
    return out


def _axis_y(scale: Scale, x: float, ticks: list[float]) -> list[str]:
    out = [f'<line x1="{x}" x2="{x}" y1="{scale.start:.1f}" y2="{scale.stop:.1f}" class="axis"/>']
    for tick in ticks:
        y = scale(tick)
        out.append(f'<line x1="{x - 4}" x2="{x}" y1="{y:.1f}" y2="{y:.1f}" class="axis"/>')
        out.append(f'<text x="{x - 6}" y="{y + 4:.1f}" class="tick" text-anchor="end">'
                   f"{tick_text(tick)}</text>")  # fmt: skip
    return out


def forest_svg(
    rows: list[tuple[str, Estimate, str]], mcid_line: float | None, unit: str, kind: str
) -> str:
    """A forest plot: one row per (label, estimate, css class), a line at 0 and
    at the MCID in the direction of benefit."""
    width, row, left, right, top = 640, 18, 150, 20, 10
    height = top + row * len(rows) + 34
    values = [v for _, e, _ in rows for v in (e.lower, e.upper)] + [0.0]
    if mcid_line is not None:
        values.append(mcid_line)
    x = Scale(*_padded(values), left, width - right)
    body = []
    for reference, css in ((0.0, "zero"), (mcid_line, "mcid")):
        if reference is not None:
            body.append(
                f'<line x1="{x(reference):.1f}" x2="{x(reference):.1f}" y1="{top}" '
                f'y2="{top + row * len(rows)}" class="{css}"/>'
            )
    for i, (label, estimate, css) in enumerate(rows):
        y = top + row * i + row / 2
        tip = f"{label}: {_interval_text(estimate)} {unit}"
        body.append(
            f'<g class="row {css}"><title>{_esc(tip)}</title>'
            f'<text x="{left - 8}" y="{y + 4:.1f}" class="label" text-anchor="end">'
            f"{_esc(label)}</text>"
            f'<line x1="{x(estimate.lower):.1f}" x2="{x(estimate.upper):.1f}" y1="{y:.1f}" '
            f'y2="{y:.1f}" class="interval"/>'
            f'<circle cx="{x(estimate.mean):.1f}" cy="{y:.1f}" r="4" class="mean"/></g>'
        )
    axis_y = top + row * len(rows) + 4
    body += _axis_x(x, axis_y, nice_ticks(x.low, x.high), tick_text)
    body.append(
        f'<text x="{(left + width - right) / 2}" y="{height - 2}" class="tick" '
        f'text-anchor="middle">effect ({_esc(unit or "outcome units")} per unit exposure)</text>'
    )
    return _svg(kind, width, height, f"forest plot: {kind}", body)


def patient_svg(panel: PatientPanel, measure: MeasureReport, axis: str) -> str:
    """The patient's readings over time with exposure periods shaded, and at the
    right their effect interval beside the population's."""
    width, height, left, top, bottom = 640, 200, 56, 10, 30
    plot_right = 500
    body = []
    times = [t for t, _ in panel.readings] + [v for s in panel.exposure for v in s[:2]]
    values = [v for _, v in panel.readings]
    if times and values:
        x = Scale(*_padded(times, 0.02), left, plot_right)
        y = Scale(*_padded(values), height - bottom, top)
        strongest = max((dose for *_, dose in panel.exposure), default=1.0)
        for start, end, dose in panel.exposure:
            opacity = 0.15 + 0.25 * dose / strongest
            body.append(
                f'<rect class="exposure" x="{x(start):.1f}" y="{top}" '
                f'width="{max(x(end) - x(start), 1.0):.1f}" height="{height - bottom - top}" '
                f'fill-opacity="{opacity:.2f}"><title>exposure {number(dose)} from '
                f"{_esc(_time_label(start, axis))} to {_esc(_time_label(end, axis))}</title></rect>"
            )
        path = " ".join(f"{x(t):.1f},{y(v):.1f}" for t, v in panel.readings)
        body.append(f'<polyline class="trace" fill="none" points="{path}"/>')
        for t, v in panel.readings:
            body.append(
                f'<circle class="reading" cx="{x(t):.1f}" cy="{y(v):.1f}" r="2.5">'
                f"<title>{_esc(_time_label(t, axis))}: {number(v)}</title></circle>"
            )
        body += _axis_y(y, left, nice_ticks(y.low, y.high, 4))
        tick_times = nice_ticks(x.low, x.high, 5)
        if axis == "date":
            first = math.ceil(x.low)
            span = max(int(x.high - x.low), 1)
            step = max(1, round(span / 5))
            tick_times = list(range(first, int(x.high) + 1, step))
        body += _axis_x(x, height - bottom, tick_times, lambda t: _time_label(t, axis))
    else:
        body.append(f'<text x="{left}" y="{height / 2}" class="note">no readings</text>')
    # the effect posterior: the patient's and the population's 90% intervals
    estimates = [e for e in (panel.effect, measure.population) if e]
    if estimates:
        values = [v for e in estimates for v in (e.lower, e.upper)] + [0.0]
        mcid = measure.mcid * (1 if measure.direction == "higher" else -1)
        values.append(mcid)
        y = Scale(*_padded(values), height - bottom, top)
        for reference, css in ((0.0, "zero"), (mcid, "mcid")):
            body.append(f'<line x1="540" x2="630" y1="{y(reference):.1f}" '
                        f'y2="{y(reference):.1f}" class="{css}"/>')  # fmt: skip
        for estimate, xpos, css, name in (
            (panel.effect, 565, "patient-effect", "patient"),
            (measure.population, 605, "population-effect", "population"),
        ):
            if estimate is None:
                continue
            body.append(
                f'<g class="{css}"><title>{name} effect {_esc(_interval_text(estimate))}</title>'
                f'<line x1="{xpos}" x2="{xpos}" y1="{y(estimate.lower):.1f}" '
                f'y2="{y(estimate.upper):.1f}" class="interval"/>'
                f'<circle cx="{xpos}" cy="{y(estimate.mean):.1f}" r="4" class="mean"/></g>'
                f'<text x="{xpos}" y="{height - bottom + 14}" class="tick" '
                f'text-anchor="middle">{name[:3]}.</text>'
            )
        body += _axis_y(y, 540, nice_ticks(y.low, y.high, 4))
        body.append(f'<text x="585" y="{height - 2}" class="tick" text-anchor="middle">'
                    "effect</text>")  # fmt: skip
    return _svg("patient", width, height, f"readings of patient {panel.patient_id}", body)


def calls_svg(calls: list[tuple[float, dict[str, int]]], axis: str) -> str:
    """Bars of the calls (one time: a fit) or each call's count over time."""
    width, left, top = 640, 150, 10
    if len(calls) == 1:
        counts = calls[0][1]
        row, height = 20, 10 + 20 * len(CALLS) + 30
        x = Scale(0, max(max(counts.values()), 1) * 1.1, left, width - 40)
        body = []
        for i, call in enumerate(CALLS):
            y = top + row * i
            body.append(
                f'<g class="bar {call}"><text x="{left - 8}" y="{y + 14}" class="label" '
                f'text-anchor="end">{call.replace("_", " ")}</text>'
                f'<rect x="{left}" y="{y + 3}" width="{x(counts.get(call, 0)) - left:.1f}" '
                f'height="{row - 6}" fill="{CALL_COLOURS[call]}"/>'
                f'<text x="{x(counts.get(call, 0)) + 4:.1f}" y="{y + 14}" class="count">'
                f"{counts.get(call, 0)}</text></g>"
            )
        return _svg("calls", width, height, "calls", body)
    height, bottom = 220, 30
    x = Scale(*_padded([t for t, _ in calls], 0.01), 56, width - 130)
    most = max(max(c.values()) for _, c in calls)
    y = Scale(0, most * 1.05 or 1, height - bottom, top)
    body = []
    for i, call in enumerate(CALLS):
        points, previous = [], None
        for t, counts in calls:
            if previous is not None:
                points.append(f"{x(t):.1f},{y(previous):.1f}")
            points.append(f"{x(t):.1f},{y(counts[call]):.1f}")
            previous = counts[call]
        body.append(
            f'<polyline class="call-line {call}" fill="none" points="{" ".join(points)}" '
            f'stroke="{CALL_COLOURS[call]}"><title>{call}: {calls[-1][1][call]} now</title>'
            "</polyline>"
            f'<text x="{width - 124}" y="{top + 14 + 16 * i}" style="fill: {CALL_COLOURS[call]}" '
            f'class="label">{call.replace("_", " ")} {calls[-1][1][call]}</text>'
        )
    body += _axis_y(y, 56, [t for t in nice_ticks(0, most, 4) if float(t).is_integer()])
    if axis == "date":
        span = max(x.high - x.low, 1e-9)
        ticks = [x.low + span * i / 4 for i in range(1, 4)]
        body += _axis_x(x, height - bottom, ticks,
                        lambda t: (EPOCH + timedelta(days=t)).strftime("%m-%d %H:%M"))  # fmt: skip
    return _svg("calls", width, height, "calls over time", body)


DRIFT_SERIES = ("shift_z", "kl", "window_shift")


def drift_svg(points: list[DriftPoint]) -> str:
    """The drift statistics of every posterior version still on the topic."""
    width, height, left, top, bottom = 640, 200, 56, 10, 30
    series = [s for s in DRIFT_SERIES if any(s in p.statistics for p in points)]
    values = [p.statistics[s] for p in points for s in series if s in p.statistics] or [0.0]
    x = Scale(*_padded([float(p.version) for p in points], 0.03), left, width - 120)
    y = Scale(*_padded([*values, 0.0]), height - bottom, top)
    colours = {"shift_z": "#4575b4", "kl": "#fc8d59", "window_shift": "#91bfdb"}
    body = []
    for i, name in enumerate(series):
        mine = [(p.version, p.statistics[name]) for p in points if name in p.statistics]
        body.append(
            f'<polyline class="drift-line {name}" fill="none" stroke="{colours[name]}" points="'
            + " ".join(f"{x(v):.1f},{y(s):.1f}" for v, s in mine)
            + '"/>'
            f'<text x="{width - 112}" y="{top + 14 + 16 * i}" style="fill: {colours[name]}" '
            f'class="label">{name}</text>'
        )
        body += [
            f'<circle class="drift-point {name}" cx="{x(v):.1f}" cy="{y(s):.1f}" r="3" '
            f'fill="{colours[name]}"><title>version {v}: {name} {number(s)}</title></circle>'
            for v, s in mine
        ]
    for p in points:
        if p.detected:
            body.append(
                f'<circle class="drift-detected" cx="{x(p.version):.1f}" cy="{top + 4}" r="4">'
                f"<title>version {p.version}: drift ({', '.join(p.kinds)})</title></circle>"
            )
    body += _axis_y(y, left, nice_ticks(y.low, y.high, 4))
    versions = [p.version for p in points]
    ticks = [
        v
        for v in nice_ticks(x.low, x.high, 6)
        if float(v).is_integer() and min(versions) <= v <= max(versions)
    ]
    body += _axis_x(x, height - bottom, ticks, lambda v: f"v{int(v)}")
    return _svg("drift", width, height, "drift statistics by posterior version", body)


STYLE = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 24px auto;
       max-width: 980px; color: #222; padding: 0 16px; }
h1 { font-size: 24px; margin-bottom: 0; } h2 { margin-top: 36px; border-bottom: 1px solid #ccc; }
h3 { font-size: 15px; margin: 18px 0 4px; }
.source, .note { color: #666; }
table { border-collapse: collapse; margin: 8px 0; }
td, th { padding: 2px 10px 2px 0; text-align: left; vertical-align: top; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
svg.plot { display: block; margin: 6px 0 10px; }
svg .axis { stroke: #444; stroke-width: 1; }
svg .tick { font-size: 11px; fill: #444; }
svg .label { font-size: 12px; fill: #222; }
svg .note { font-size: 13px; fill: #888; }
svg .zero { stroke: #999; stroke-dasharray: 3 3; }
svg .mcid { stroke: #1a9850; stroke-dasharray: 6 3; }
svg .interval { stroke: #222; stroke-width: 2; }
svg .mean { fill: #222; }
svg g.population .interval, svg g.population-effect .interval { stroke: #4575b4; stroke-width: 3; }
svg g.population .mean, svg g.population-effect .mean { fill: #4575b4; }
svg .exposure { fill: #fdae61; }
svg .band { fill: #4575b4; fill-opacity: 0.25; stroke: none; }
svg .curve-mean { fill: none; stroke: #4575b4; stroke-width: 2; }
svg .trace { fill: none; stroke: #777; stroke-width: 1; }
svg .reading { fill: #2c7bb6; }
svg .call-line, svg .drift-line { fill: none; stroke-width: 2; }
svg .drift-detected { fill: #d73027; }
.call { font-weight: 600; }
.call.responder { color: #1a9850; } .call.non_responder { color: #d73027; }
.patient-card { break-inside: avoid; }
"""


def _facts_table(facts: list[tuple[str, str]]) -> str:
    if not facts:
        return ""
    rows = "".join(f"<tr><th>{_esc(k)}</th><td>{_esc(v)}</td></tr>" for k, v in facts)
    return f'<table class="facts">{rows}</table>'


def curve_svg(curve: Curve, references: list[tuple[float, str]]) -> str:
    """A curve: its 90% band shaded, its mean as a line, a dashed line at each
    (value, css class) of ``references`` (no effect, the MCID)."""
    width, height, left, right, top, bottom = 640, 220, 60, 20, 10, 40
    values = [*curve.lower, *curve.upper, *(value for value, _ in references)]
    x = Scale(min(curve.x), max(curve.x), left, width - right)
    y = Scale(*_padded(values), height - bottom, top)
    band = [(x(a), y(b)) for a, b in zip(curve.x, curve.upper, strict=True)]
    band += [(x(a), y(b)) for a, b in reversed(list(zip(curve.x, curve.lower, strict=True)))]
    body = []
    for value, css in references:
        body.append(
            f'<line x1="{x.start:.1f}" x2="{x.stop:.1f}" y1="{y(value):.1f}" '
            f'y2="{y(value):.1f}" class="{css}"/>'
        )
    body.append(
        '<polygon class="band" points="' + " ".join(f"{a:.1f},{b:.1f}" for a, b in band) + '"/>'
    )
    body.append(
        '<polyline class="curve-mean" points="'
        + " ".join(f"{x(a):.1f},{y(b):.1f}" for a, b in zip(curve.x, curve.mean, strict=True))
        + '"/>'
    )
    body += _axis_x(x, height - bottom, nice_ticks(x.low, x.high), tick_text)
    body += _axis_y(y, left, nice_ticks(y.low, y.high))
    body.append(
        f'<text x="{(left + width - right) / 2}" y="{height - 4}" class="tick" '
        f'text-anchor="middle">{_esc(curve.x_label)}</text>'
    )
    body.append(
        f'<text x="12" y="{(top + height - bottom) / 2}" class="tick" text-anchor="middle" '
        f'transform="rotate(-90 12 {(top + height - bottom) / 2})">{_esc(curve.y_label)}</text>'
    )
    return _svg(curve.kind, width, height, f"{curve.title} with its 90% band", body)


def curve_table(curve: Curve, points: int = 5) -> str:
    """The curve at ``points`` places across its range, as numbers."""
    picks = sorted({round(k) for k in np.linspace(0, len(curve.x) - 1, points)})
    rows = "".join(
        f'<tr><td class="num">{number(curve.x[k])}</td><td class="num">{number(curve.mean[k])}'
        f'</td><td class="num">{number(curve.lower[k])} to {number(curve.upper[k])}</td></tr>'
        for k in picks
    )
    return (
        f'<table class="curve" data-curve="{_esc(curve.kind)}"><tr><th>{_esc(curve.x_label)}'
        f"</th><th>mean</th><th>90% band</th></tr>{rows}</table>"
    )


def _measure_html(measure: MeasureReport, axis: str) -> str:
    unit = measure.unit
    benefit = "higher" if measure.direction == "higher" else "lower"
    mcid_line = measure.mcid * (1 if measure.direction == "higher" else -1)
    parts = [
        f'<section class="measure" id="measure-{_esc(measure.name)}">',
        f"<h2>{_esc(measure.name)}</h2>",
        f'<p class="note">unit {_esc(unit or "none given")}; {benefit} is better; MCID '
        f"{measure.mcid:g}; intervals are 90% credible intervals.</p>",
        "<h3>Population effect</h3>",
    ]
    if measure.population:
        parts.append(
            f'<p class="population-effect">population effect <span class="value">'
            f"{_esc(_interval_text(measure.population))}</span> {_esc(unit)}</p>"
        )
        rows = [("population", measure.population, "population")]
        rows += [(f"cohort {name}", estimate, "cohort") for name, estimate in measure.cohorts]
        parts.append(forest_svg(rows, mcid_line, unit, "forest-population"))
        if measure.cohorts:
            parts.append('<table class="cohorts"><tr><th>cohort</th><th>effect</th></tr>')
            parts += [
                f"<tr><td>{_esc(n)}</td><td>{_esc(_interval_text(e))}</td></tr>"
                for n, e in measure.cohorts
            ]
            parts.append("</table>")
        else:
            parts.append('<p class="note">No cohort level in this fit.</p>')
    else:
        parts.append('<p class="note">No population posterior yet.</p>')
    parts.append(_facts_table(measure.facts))
    for curve in measure.curves:
        effect = curve.kind.startswith("curve-effect")
        parts.append(f"<h3>{_esc(curve.title)}</h3>")
        parts.append(
            f'<p class="note">{_esc(curve.y_label)} ({_esc(unit or "outcome units")}), '
            f"posterior mean and 90% band"
            + (", every other covariate at its typical value" if effect else "")
            + ".</p>"
        )
        references = [(0.0, "zero")] + ([(mcid_line, "mcid")] if effect else [])
        parts.append(curve_svg(curve, references))
        parts.append(curve_table(curve))

    parts.append("<h3>Calls</h3>")
    if measure.calls:
        now = measure.calls[-1][1]
        parts.append(
            '<p class="calls">'
            + ", ".join(
                f'<span class="call {c}">{c.replace("_", " ")}</span> '
                f'<span class="count" data-call="{c}">{now.get(c, 0)}</span>'
                for c in CALLS
            )
            + "</p>"
        )
        parts.append(calls_svg(measure.calls, axis))
    else:
        parts.append('<p class="note">No scores yet.</p>')

    if axis == "date":
        parts.append("<h3>Drift</h3>")
        if measure.drift:
            parts.append(drift_svg(measure.drift))
            last = measure.drift[-1]
            parts.append(
                '<table class="drift"><tr><th>statistic</th><th>latest (version '
                f"{last.version})</th></tr>"
                + "".join(
                    f'<tr><td>{_esc(k)}</td><td class="num">{number(v)}</td></tr>'
                    for k, v in sorted(last.statistics.items())
                )
                + "</table>"
            )
            parts.append(
                f'<p class="note">{len(measure.drift)} posterior version(s) on the topic (it '
                "is compacted: older versions thin out); "
                f"{sum(p.detected for p in measure.drift)} flagged drift.</p>"
            )
        else:
            parts.append('<p class="note">No population posterior yet.</p>')
        if measure.drift_alerts:
            parts.append('<ul class="drift-alerts">')
            parts += [
                f"<li>{_esc(a['event_time'][:19])}: {_esc(a['message'])}</li>"
                for a in measure.drift_alerts
            ]
            parts.append("</ul>")

    effects = [
        (p.patient_id, p.effect, "patient")
        for p in sorted((p for p in measure.patients if p.effect), key=lambda p: p.effect.mean)
    ]
    if effects:
        parts.append("<h3>Patients' effects</h3>")
        parts.append(forest_svg(effects, mcid_line, unit, "forest-patients"))
    hidden = len(measure.shown_patients) - len(measure.patients)
    parts.append(f"<h3>Patients ({len(measure.patients)} drawn)</h3>")
    if hidden > 0:
        parts.append(
            f'<p class="note">{hidden} more patients are not drawn (--show PATIENT, '
            "--max-patients N).</p>"
        )
    for panel in measure.patients:
        effect = _interval_text(panel.effect) if panel.effect else "n/a"
        call = panel.call or "n/a"
        probability = (
            number(panel.p_benefit_ge_mcid) if panel.p_benefit_ge_mcid is not None else "n/a"
        )
        parts.append(
            f'<div class="patient-card" data-patient="{_esc(panel.patient_id)}">'
            f"<h4>patient {_esc(panel.patient_id)} (cohort {_esc(panel.cohort)})</h4>"
            f'<p>effect <span class="effect">{_esc(effect)}</span> {_esc(unit)}; '
            f"P(benefit ≥ MCID) {probability}; call "
            f'<span class="call {_esc(call)}">{_esc(call.replace("_", " "))}</span>; '
            f"{len(panel.readings)} readings</p>" + patient_svg(panel, measure, axis) + "</div>"
        )
    parts.append("</section>")
    return "\n".join(parts)


def render(report: Report) -> str:
    """The report as one self-contained HTML page (inline CSS and SVG)."""
    axis = report.time_axis
    time_note = (
        "Times are event times (UTC)."
        if axis == "date"
        else f"Time axis: {'row order per patient' if axis == 'observation' else axis}."
    )
    body = "\n".join(_measure_html(m, axis) for m in report.measures)
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        f"<title>{_esc(report.title)}</title><style>{STYLE}</style></head><body>\n"
        f"<h1>{_esc(report.title)}</h1>\n"
        f'<p class="source">{_esc(report.source)}. {time_note} Shaded: exposure periods '
        "(darker: higher dose). Dashed lines: no effect (grey) and the MCID in the "
        "direction of benefit (green).</p>\n"
        f"{body}\n</body></html>\n"
    )
