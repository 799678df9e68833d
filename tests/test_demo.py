"""The README's main command, run as a user would, for a bounded time."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.kafka
def test_efficacy_demo_runs_and_prints_results(kafka_bootstrap):
    env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap}
    env.pop("EFFICACY_BOOTSTRAP_SERVERS", None)
    result = subprocess.run(
        [sys.executable, "-m", "streams.cli", "demo", "--seconds", "90"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=240, check=False,
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "10 observations accepted, 1 dead-lettered" in output
    assert "dead letter  reason=malformed_json" in output
