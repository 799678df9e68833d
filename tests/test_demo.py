"""The README's main command, run as a user would, for a bounded time."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.kafka
def test_efficacy_demo_runs_and_prints_live_scores(kafka_bootstrap):
    env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap}
    env.pop("EFFICACY_BOOTSTRAP_SERVERS", None)
    result = subprocess.run(
        [sys.executable, "-m", "cli.main", "demo", "--seconds", "400",
         "--patients", "60", "--cohorts", "4", "--rate", "1000"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "the programme is fully scored" in output, output[-3000:]
    scored = [int(n) for n in re.findall(r"patients scored (\d+)", output)]
    assert scored and scored[-1] == 60
    dead = [int(n) for n in re.findall(r"dead-lettered (\d+)", output)]
    assert dead and dead[-1] > 0  # the simulated programme includes bad records
    for measure in ("resting_heart_rate", "hba1c"):
        assert re.search(rf"{measure}: population effect [-+][\d.]+ \(90% ", output)
    assert re.search(
        r"P\(benefit >= MCID [\d.]+\) = [\d.]+, (responder|non_responder|uncertain)", output
    )
    # tells the user how to read the scores with the project's own commands
    assert "efficacy scores" in output and "efficacy alerts" in output
    assert "kafka-console-consumer" not in output  # a tool the project does not ship
