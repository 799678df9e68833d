"""The README's main command, run as a user would: it tells the story (calls
against the simulated truth) and ends only when every score rests on the final
population posterior."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from cli.kafka_io import read_to_end, run

REPO = Path(__file__).resolve().parent.parent
CALLS = ("non_responder", "uncertain", "responder", "insufficient_data")


def true_class(effect: float, direction: str, mcid: float) -> str:
    """No benefit: non-responder; a benefit of at least the MCID: responder."""
    benefit = effect if direction == "higher" else -effect
    return "non_responder" if benefit <= 0 else "responder" if benefit >= mcid else "partial"


@pytest.mark.kafka
def test_efficacy_demo_tells_the_story_and_ends_on_the_final_posterior(kafka_bootstrap, tmp_path):
    env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap}
    env.pop("EFFICACY_BOOTSTRAP_SERVERS", None)
    truth_file = tmp_path / "truth.json"
    result = subprocess.run(
        [sys.executable, "-m", "cli.main", "demo", "--seconds", "400",
         "--patients", "60", "--cohorts", "4", "--rate", "1000", "--truth", str(truth_file)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "the programme is fully scored" in output, output[-3000:]
    final = re.search(r"final population posteriors (.*); every score is current", output)
    assert final, output[-3000:]
    final_versions = {m: int(v) for m, v in re.findall(r"(\w+) v(\d+)", final.group(1))}
    scored = [int(n) for n in re.findall(r"patients scored (\d+)", output)]
    assert scored and scored[-1] == 60
    dead = [int(n) for n in re.findall(r"dead-lettered (\d+)", output)]
    assert dead and dead[-1] > 0  # the simulated programme includes bad records
    # the rate shown is the current one: nothing is being sent once all is sent
    total = int(re.search(r"; (\d+) records at", output).group(1))
    assert re.search(rf"sent {total} events \(0/s now\)", output)
    # library warnings (aiokafka's retries while topics are created) stay off the terminal
    assert "WARNING" not in output and "aiokafka" not in output
    assert re.search(
        r"P\(benefit >= MCID [\d.]+\) = [\d.]+, (responder|non_responder|uncertain)", output
    )
    # tells the user how to read the scores with the project's own commands
    assert "efficacy scores" in output and "efficacy alerts" in output
    hint = re.search(
        r"^  KAFKA_BOOTSTRAP_SERVERS=(\S+) EFFICACY_TOPIC_PREFIX=(\S+) efficacy scores "
        r"--call non_responder$",
        output,
        re.M,
    )
    assert hint, output[-3000:]  # on a configured broker: the commands for this run's topics
    assert "kafka-console-consumer" not in output  # a tool the project does not ship

    # The printed truth table is the latest scores on the topic against the truth.
    truth = json.loads(truth_file.read_text())
    topic = re.search(r"Scores are JSON on the topic (\S+) \(key", output).group(1)
    latest = {r.key: json.loads(r.value) for r in run(read_to_end(kafka_bootstrap, topic))}
    assert len(latest) == 60
    # the printed command lists the non-responders on the topic, with their action
    listed = subprocess.run(
        [sys.executable, "-m", "cli.main", "scores", "--call", "non_responder"],
        cwd=REPO,
        env={**env, "KAFKA_BOOTSTRAP_SERVERS": hint.group(1),
             "EFFICACY_TOPIC_PREFIX": hint.group(2)},
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    patients = {score["patient_id"] for score in latest.values()}
    rows = [line.split() for line in listed.stdout.splitlines()]
    called = [row for row in rows if row and row[0] in patients and "non_responder" in row]
    assert {row[0] for row in called} == {
        score["patient_id"]
        for score in latest.values()
        if any(m["classification"] == "non_responder" for m in score["measures"])
    }
    for row in called:  # the recommended action follows the posterior version
        version_at = max(i for i, token in enumerate(row) if re.fullmatch(r"v\d+", token))
        assert row[version_at + 1 :], row
    # the final posteriors are the newest on the topic, and no score is newer
    prefix = topic.removesuffix("scores")
    posteriors = run(read_to_end(kafka_bootstrap, prefix + "population-posterior"))
    newest: dict[str, int] = {}
    for record in posteriors:
        body = json.loads(record.value)
        newest[body["measure"]] = max(newest.get(body["measure"], 0), body["version"])
    assert final_versions == newest
    for measure, spec in truth["measures"].items():
        expected: dict[str, Counter[str]] = {}
        for score in latest.values():
            (m,) = [m for m in score["measures"] if m["measure"] == measure]
            assert m["population_version"] <= final_versions[measure]
            effect = truth["patients"][score["patient_id"]]["effect"][measure]
            cls = true_class(effect, spec["direction"], spec["mcid"])
            expected.setdefault(cls, Counter())[m["classification"]] += 1
        block = output.split(f"{measure}: true class -> latest calls", 1)[1]
        for cls, counts in expected.items():
            row = re.search(rf"(?<!\w){cls}:\s+(\d+) patients -> ([\d, ]+)", block)
            assert row, (measure, cls)
            assert int(row.group(1)) == sum(counts.values())
            assert [int(n) for n in row.group(2).split(",")] == [counts[c] for c in CALLS]
    found = re.search(r"resting_heart_rate: true class.*?found (\d+) of (\d+) true", output, re.S)
    assert found and int(found.group(1)) >= 1  # true non-responders are found
