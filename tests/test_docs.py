"""The reference pages describe the product as it is: every setting and every
metric is documented, and every relative link of README.md and docs/ resolves."""

from __future__ import annotations

import re
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter

from monitoring.metrics import create_metrics
from streams.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_every_setting_is_in_the_settings_page():
    page = (ROOT / "docs" / "settings.md").read_text()
    for name in Settings.model_fields:
        variable = "EFFICACY_DRIFT__" if name == "drift" else f"EFFICACY_{name.upper()}"
        assert f"`{variable}" in page, variable


def test_every_metric_is_in_the_monitoring_page():
    page = (ROOT / "docs" / "monitoring.md").read_text()
    metrics = create_metrics(CollectorRegistry())
    for metric in metrics:
        name = metric._name + ("_total" if isinstance(metric, Counter) else "")
        assert f"`{name}`" in page, name


def test_relative_links_resolve():
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" in target:
                continue
            assert (page.parent / target).exists(), f"{page.name}: {target}"
