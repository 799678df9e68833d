"""``efficacy report`` looked at as a person would: the HTML is rendered by
headless Chromium (the DOM after rendering, and a screenshot) and what is on
the page is checked against the fit result and the topics read independently:
titles, the numbers, where the plotted points sit on their axes, how many plots
and readings there are. Chromium comes from Debian (scripts/install-chromium.sh,
run by ``make test``); a test fails, never skips, when it cannot run.
"""

from __future__ import annotations

import asyncio
import csv
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from model.config import Standardization
from model.offline import cohort_effects

REPO = Path(__file__).resolve().parent.parent
SLEEPSTUDY = REPO / "tests" / "data" / "sleepstudy" / "sleepstudy.csv"
COLUMNS = ["--patient", "Subject", "--exposure", "Days", "--outcome", "Reaction"]
NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


# --- the browser and the page -------------------------------------------------------


def chromium(page: Path, *args: str) -> str:
    """Run headless Chromium on ``page`` with ``args``; its standard output."""
    binary = shutil.which("chromium") or "/usr/bin/chromium"
    assert Path(binary).exists(), "chromium is not installed: run scripts/install-chromium.sh"
    with tempfile.TemporaryDirectory() as profile:
        result = subprocess.run(
            [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
             "--no-first-run", "--disable-background-networking", "--disable-component-update",
             "--disable-sync", f"--user-data-dir={profile}", *args, page.resolve().as_uri()],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


class Node:
    def __init__(self, tag: str, attrs: dict[str, str], parent: Node | None) -> None:
        self.tag, self.attrs, self.parent = tag, attrs, parent
        self.children: list[Node | str] = []

    @property
    def classes(self) -> set[str]:
        return set(self.attrs.get("class", "").split())

    def text(self) -> str:
        return "".join(c if isinstance(c, str) else c.text() for c in self.children)

    def walk(self):
        yield self
        for child in self.children:
            if isinstance(child, Node):
                yield from child.walk()

    def find_all(self, tag: str | None = None, cls: str | None = None) -> list[Node]:
        return [
            n
            for n in self.walk()
            if (tag is None or n.tag == tag) and (cls is None or cls in n.classes)
        ]

    def find(self, tag: str | None = None, cls: str | None = None) -> Node:
        found = self.find_all(tag, cls)
        assert found, f"no <{tag} class={cls}> on the page"
        return found[0]


VOID = {"meta", "br", "img", "input", "link", "hr"}


class DomParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.root = Node("#document", {}, None)
        self.current = self.root

    def handle_starttag(self, tag, attrs):
        node = Node(tag, {k: v or "" for k, v in attrs}, self.current)
        self.current.children.append(node)
        if tag not in VOID:
            self.current = node

    def handle_startendtag(self, tag, attrs):
        self.current.children.append(Node(tag, {k: v or "" for k, v in attrs}, self.current))

    def handle_endtag(self, tag):
        node = self.current
        while node is not None and node.tag != tag:
            node = node.parent
        if node is not None and node.parent is not None:
            self.current = node.parent

    def handle_data(self, data):
        self.current.children.append(data)


def rendered(page: Path) -> Node:
    """The DOM Chromium rendered from ``page``."""
    parser = DomParser()
    parser.feed(chromium(page, "--dump-dom"))
    return parser.root


def numbers(text: str) -> list[float]:
    return [float(n) for n in NUMBER.findall(text)]


def close(shown: float, value: float) -> bool:
    """``shown`` is ``value`` to the page's four significant digits."""
    return abs(shown - value) <= 6e-4 * abs(value) + 1e-9


def assert_interval_shown(text: str, estimate: dict) -> None:
    """``text`` shows mean (90% q05 to q95) of the estimate."""
    shown = numbers(text.replace("90%", ""))
    wanted = [estimate["mean"], estimate["q05"], estimate["q95"]]
    assert len(shown) >= 3 and all(map(close, shown[:3], wanted)), (text, wanted)


def axis_value(svg: Node, x: float) -> float:
    """The value at horizontal position ``x`` on the plot's x axis, read from its
    tick labels (the first and last tick: their text and where they stand)."""
    ticks = [t for t in svg.find_all("text", "tick") if NUMBER.fullmatch(t.text().strip())]
    first, last = ticks[0], ticks[-1]
    x0, v0 = float(first.attrs["x"]), float(first.text())
    x1, v1 = float(last.attrs["x"]), float(last.text())
    return v0 + (x - x0) * (v1 - v0) / (x1 - x0)


def axis_tolerance(svg: Node) -> float:
    """One pixel of the x axis, in its units."""
    return abs(axis_value(svg, 1.0) - axis_value(svg, 0.0))


def efficacy(*args: str, env: dict | None = None, timeout: float = 600):
    return subprocess.run(
        [sys.executable, "-m", "cli.main", *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip


# --- a fit of sleepstudy with two cohorts ---------------------------------------------


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """sleepstudy with a cohort column (odd and even subject numbers), fitted."""
    folder = tmp_path_factory.mktemp("report")
    rows = list(csv.DictReader(SLEEPSTUDY.open(newline="")))
    data = folder / "sleepstudy-groups.csv"
    with data.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=[*rows[0], "group"])
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, "group": "odd" if int(row["Subject"]) % 2 else "even"})
    fit = folder / "fit.json"
    result = efficacy("fit", "--input", str(data), *COLUMNS, "--cohort", "group",
                      "--direction", "lower", "--mcid", "5", "--min-unexposed", "1",
                      "--seed", "2", "--output", str(fit))  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    page = folder / "report.html"
    result = efficacy("report", "--fit", str(fit), "--input", str(data), *COLUMNS,
                      "--output", str(page))  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(fit.read_text()), rows, page


def test_the_report_of_a_fit_shows_the_fit(fitted):
    fit, rows, page = fitted
    dom = rendered(page)
    assert dom.find("title").text() == "Efficacy report: Reaction"
    assert dom.find("h1").text() == "Efficacy report: Reaction"
    assert [h.text() for h in dom.find_all("h2")] == ["Reaction"]
    # no network resources: nothing the page loads
    for node in dom.walk():
        assert "src" not in node.attrs and node.tag not in ("link", "script"), node.tag
    assert_interval_shown(dom.find(cls="population-effect").text(), fit["population"]["effect"])

    # the plots: population and cohorts, calls, every patient's effect, one per patient
    patients = fit["patients"]
    plots = Counter(
        next(c for c in svg.classes if c != "plot") for svg in dom.find_all("svg", "plot")
    )
    assert plots == {
        "forest-population": 1, "calls": 1, "forest-patients": 1, "patient": len(patients),
    }  # fmt: skip

    # the forest plot: one row per cohort besides the population, each where the fit puts it
    forest = dom.find("svg", "forest-population")
    rows_drawn = forest.find_all("g", "row")
    assert [r.find("text").text() for r in rows_drawn] == ["population"] + [
        f"cohort {c['cohort']}" for c in fit["cohorts"]
    ]
    pixel = axis_tolerance(forest)
    for row, estimate in zip(
        rows_drawn,
        [fit["population"]["effect"]] + [c["effect"] for c in fit["cohorts"]],
        strict=True,
    ):
        assert_interval_shown(row.find("title").text(), estimate)
        mean = float(row.find("circle").attrs["cx"])
        line = row.find("line", "interval")
        assert abs(axis_value(forest, mean) - estimate["mean"]) <= pixel
        assert abs(axis_value(forest, float(line.attrs["x1"])) - estimate["q05"]) <= pixel
        assert abs(axis_value(forest, float(line.attrs["x2"])) - estimate["q95"]) <= pixel

    # the calls, counted from the fit
    calls = Counter(p["classification"] for p in patients)
    for span in dom.find_all("span", "count"):
        assert int(span.text()) == calls.get(span.attrs["data-call"], 0)

    # a patient: their interval, their readings (from the CSV), the exposure shaded
    patient = max(patients, key=lambda p: p["effect"]["mean"])
    card = next(n for n in dom.find_all("div", "patient-card")
                if n.attrs["data-patient"] == patient["patient_id"])  # fmt: skip
    assert f"patient {patient['patient_id']} (cohort {patient['cohort']})" in card.text()
    assert_interval_shown(card.find("span", "effect").text(), patient["effect"])
    assert card.find("span", "call").text() == patient["classification"].replace("_", " ")
    mine = [r for r in rows if r["Subject"] == patient["patient_id"]]
    svg = card.find("svg", "patient")
    assert len(svg.find_all("circle", "reading")) == len(mine)
    exposed = [r for r in mine if float(r["Days"]) > 0]
    assert len(svg.find_all("rect", "exposure")) == len({r["Days"] for r in exposed})
    effect = svg.find("g", "patient-effect")
    assert_interval_shown(effect.find("title").text(), patient["effect"])
    # the patients' forest plot lists every patient, lowest effect first
    listed = [r.find("text").text() for r in dom.find("svg", "forest-patients").find_all("g")]
    assert listed == [p["patient_id"] for p in sorted(patients, key=lambda p: p["effect"]["mean"])]


def test_the_report_of_a_fit_looks_drawn(fitted, tmp_path):
    """A screenshot: the page is not blank and the plots' colours are on it."""
    from PIL import Image

    _, _, page = fitted
    shot = tmp_path / "report.png"
    chromium(page, f"--screenshot={shot}", "--window-size=1000,1400", "--hide-scrollbars")
    image = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert image.shape[:2] == (1400, 1000)

    def pixels(rgb: str) -> int:
        colour = np.array([int(rgb[i : i + 2], 16) for i in (1, 3, 5)])
        return int((np.abs(image - colour).sum(axis=2) <= 30).sum())

    assert pixels("#4575b4") > 100  # the population interval, blue
    assert pixels("#d73027") > 100  # the non-responder bar, red
    assert (image.sum(axis=2) < 200).mean() > 0.005  # text and lines


# --- a fit with curves ----------------------------------------------------------------


def tick_scale(svg: Node, anchor: str, position: str) -> tuple[float, float, float, float]:
    """(pixel, value) of the first and last numeric tick label of one axis: the x
    axis' labels are centred on their ticks, the y axis' end at them."""
    ticks = [
        t
        for t in svg.find_all("text", "tick")
        if t.attrs.get("text-anchor") == anchor and NUMBER.fullmatch(t.text().strip())
    ]
    first, last = ticks[0], ticks[-1]
    # a y tick's text sits 4 px below the tick's line (its baseline)
    shift = 4.0 if position == "y" else 0.0
    return (float(first.attrs[position]) - shift, float(first.text()),
            float(last.attrs[position]) - shift, float(last.text()))  # fmt: skip


def on_axis(scale: tuple[float, float, float, float], pixel: float) -> float:
    p0, v0, p1, v1 = scale
    return v0 + (pixel - p0) * (v1 - v0) / (p1 - p0)


def test_the_report_of_a_smooth_fit_draws_its_curves(tmp_path):
    """`efficacy fit --smooth age --daily-cycle 2` then `efficacy report --fit`:
    the page has the expected effect by age and the daily cycle, each drawn where
    the fit puts it: the mean line and both edges of the 90% band read back off
    the plot's own axes within a pixel at every grid point, and the table of the
    curve shows the fit's numbers."""
    from test_smooth import WEARABLE, _write_wearable_csv

    spec = WEARABLE.model_copy(update={"num_patients": 60, "num_cohorts": 4, "obs_per_patient": 20})
    data = tmp_path / "wearable.csv"
    _write_wearable_csv(data, spec, seed=2)
    fit_path, page = tmp_path / "fit.json", tmp_path / "report.html"
    result = efficacy("fit", "--input", str(data), "--patient", "patient", "--exposure", "dose",
                      "--outcome", "rhr", "--cohort", "clinic", "--time", "day", "--mcid", "2",
                      "--direction", "lower", "--smooth", "age", "--daily-cycle", "2",
                      "--time-of-day", "clock", "--output", str(fit_path))  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    result = efficacy("report", "--fit", str(fit_path), "--output", str(page))
    assert result.returncode == 0, result.stderr[-2000:]
    fit = json.loads(fit_path.read_text())
    dom = rendered(page)
    (curve,) = fit["curves"]
    wanted = {
        "curve-effect-age": (curve["grid"], curve["effect"]),
        "curve-daily-cycle": (fit["daily_cycle"]["hour"], fit["daily_cycle"]),
    }
    headings = [h.text() for h in dom.find_all("h3")]
    assert "Expected effect by age" in headings and "Daily cycle" in headings
    for kind, (grid, band) in wanted.items():
        svg = dom.find("svg", kind)
        x_scale, y_scale = tick_scale(svg, "middle", "x"), tick_scale(svg, "end", "y")
        x_pixel = abs(on_axis(x_scale, 1.0) - on_axis(x_scale, 0.0))
        y_pixel = abs(on_axis(y_scale, 1.0) - on_axis(y_scale, 0.0))

        def points(node: Node) -> np.ndarray:
            return np.asarray(
                [[float(v) for v in p.split(",")] for p in node.attrs["points"].split()]
            )

        line = points(svg.find("polyline", "curve-mean"))
        assert line.shape == (len(grid), 2)
        assert np.allclose([on_axis(x_scale, x) for x in line[:, 0]], grid, atol=x_pixel)
        assert np.allclose([on_axis(y_scale, y) for y in line[:, 1]], band["mean"], atol=y_pixel)
        outline = points(svg.find("polygon", "band"))
        upper, lower = outline[: len(grid)], outline[len(grid) :][::-1]
        assert np.allclose([on_axis(y_scale, y) for y in upper[:, 1]], band["q95"], atol=y_pixel)
        assert np.allclose([on_axis(y_scale, y) for y in lower[:, 1]], band["q05"], atol=y_pixel)
        table = next(t for t in dom.find_all("table", "curve") if t.attrs["data-curve"] == kind)
        for row in table.find_all("tr")[1:]:
            cells = [numbers(cell.text()) for cell in row.find_all("td")]
            (x,), (mean,), (low, high) = cells
            k = int(np.argmin(np.abs(np.asarray(grid) - x)))
            assert close(mean, band["mean"][k]), (kind, x, mean)
            assert close(low, band["q05"][k]) and close(high, band["q95"][k]), (kind, x)


def test_cohort_effects_are_the_mixture_over_draws():
    """model.offline.cohort_effects against samples of the mixture it summarises."""
    rng = np.random.default_rng(4)
    draws, cohorts = 300, 3
    effect = rng.normal(-0.4, 0.1, draws)
    mean = rng.normal(0.0, 0.3, (draws, cohorts))
    var = rng.uniform(0.01, 0.05, (draws, cohorts))
    std = Standardization(outcome_location=70.0, outcome_scale=8.0, exposure_scale=2.0)
    summaries = cohort_effects(effect, mean, var, std)
    samples = (effect[:, None, None] + mean[:, :, None]
               + np.sqrt(var)[:, :, None] * rng.standard_normal((draws, cohorts, 2000)))  # fmt: skip
    raw = samples * 8.0 / 2.0
    for g, summary in enumerate(summaries):
        values = raw[:, g, :].ravel()
        tolerance = 4 * values.std() / np.sqrt(draws)  # draws are the unit of noise
        assert abs(summary["mean"] - values.mean()) < 1e-9 + tolerance / 4
        assert abs(summary["sd"] - values.std()) < tolerance
        assert abs(summary["q05"] - np.quantile(values, 0.05)) < tolerance
        assert abs(summary["q95"] - np.quantile(values, 0.95)) < tolerance


def test_report_errors_are_plain(tmp_path):
    result = efficacy("report", "--fit", str(tmp_path / "absent.json"), "--output",
                      str(tmp_path / "r.html"))  # fmt: skip
    assert result.returncode == 2 and "absent.json" in result.stderr
    helped = efficacy("report", "--help")
    assert helped.returncode == 0
    assert "default: 24" in helped.stdout and "efficacy report --fit fit.json" in helped.stdout


# --- the topics of a real worker -----------------------------------------------------


@pytest.mark.kafka
def test_the_report_of_the_topics_shows_what_the_pipeline_published(kafka_bootstrap, tmp_path):
    from settling import latest_by_key
    from test_reliability import MEASURE, Run, small_programme, wait_settled

    from cli.kafka_io import read_to_end
    from cli.simulate import publish
    from cli.worker_process import WorkerProcess

    run = Run(kafka_bootstrap, "report", small_programme(seed=71, patients=30))
    with WorkerProcess(run.env(tmp_path / "worker")) as worker:
        asyncio.run(publish(run.programme, run.settings))
        wait_settled(run, timeout=420)
        assert worker.stop() == 0, worker.log_tail()

    def latest(topic: str) -> dict[str, dict]:
        records = asyncio.run(read_to_end(kafka_bootstrap, run.prefix + topic))
        return {k.decode(): json.loads(r.value) for k, r in latest_by_key(records).items()}

    scores = latest("scores")
    posterior = latest("population-posterior")[MEASURE]
    page = tmp_path / "programme.html"
    result = efficacy("report", "--max-patients", "5", "--output", str(page),
                      env={**os.environ, **run.env(tmp_path)}, timeout=180)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    dom = rendered(page)
    assert [h.text() for h in dom.find_all("h2")] == [MEASURE]
    effect = posterior["summary"]["effect"]
    estimate = {"mean": effect["mean"], "q05": effect["lower"], "q95": effect["upper"]}
    assert_interval_shown(dom.find(cls="population-effect").text(), estimate)
    forest = dom.find("svg", "forest-population")
    cohorts = {t.cohort for t in run.truth.patients.values()}
    assert [r.find("text").text() for r in forest.find_all("g", "row")] == ["population"] + [
        f"cohort {c}" for c in posterior["cohorts"]
    ]
    assert set(posterior["cohorts"]) == cohorts

    calls = Counter(s["measures"][0]["classification"] for s in scores.values())
    for span in dom.find_all("span", "count"):
        assert int(span.text()) == calls.get(span.attrs["data-call"], 0)
    plots = Counter(
        next(c for c in svg.classes if c != "plot") for svg in dom.find_all("svg", "plot")
    )
    assert plots == {
        "forest-population": 1, "calls": 1, "drift": 1, "forest-patients": 1, "patient": 5,
    }  # fmt: skip
    drift = dom.find("table", "drift")
    assert f"version {posterior['version']}" in drift.text()
    for row in drift.find_all("tr")[1:]:
        name, value = (cell.text() for cell in row.find_all("td"))
        assert close(float(value), posterior["drift"][name]), name

    # the first five patients by id: their intervals and every reading in their statistics
    shown = sorted(scores)[:5]  # zero-padded ids: the first five by id
    cards = {c.attrs["data-patient"]: c for c in dom.find_all("div", "patient-card")}
    assert sorted(cards) == sorted(shown)
    for patient_id in shown:
        (measure,) = scores[patient_id]["measures"]
        card = cards[patient_id]
        interval = measure["effect"]
        assert_interval_shown(
            card.find("span", "effect").text(),
            {"mean": interval["mean"], "q05": interval["lower"], "q95": interval["upper"]},
        )
        readings = card.find("svg", "patient").find_all("circle", "reading")
        assert len(readings) == measure["count_exposed"] + measure["count_unexposed"]
        assert card.find("svg", "patient").find_all("rect", "exposure")
