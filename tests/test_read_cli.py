"""``efficacy scores`` and ``efficacy alerts`` against a real worker's topics.

Each answer is checked against the topic read independently (the latest score
per patient, every alert) and the filters against the simulation's truth
(cohorts) and the scores themselves (calls): nothing is compared with the
command's own output.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from settling import latest_by_key
from test_reliability import MEASURE, Run, small_programme, wait_settled

from cli.kafka_io import produce, read_to_end
from cli.worker_process import WorkerProcess

pytestmark = pytest.mark.kafka


def efficacy(run: Run, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """``efficacy ARGS`` with the run's settings (broker, topic prefix)."""
    env = {**os.environ, **run.env(Path("."))}
    return subprocess.run(
        [sys.executable, "-m", "cli.main", *args],
        env=env, capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip


def jsonl(result: subprocess.CompletedProcess) -> list[dict]:
    assert result.returncode == 0, result.stderr[-2000:]
    return [json.loads(line) for line in result.stdout.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def settled(kafka_bootstrap, tmp_path_factory):
    run = Run(kafka_bootstrap, "readcli", small_programme(seed=61, patients=40))
    with WorkerProcess(run.env(tmp_path_factory.mktemp("w"))) as worker:
        from cli.simulate import publish

        asyncio.run(publish(run.programme, run.settings))
        wait_settled(run, timeout=420)
        assert worker.stop() == 0, worker.log_tail()
    scores = {k.decode(): json.loads(r.value) for k, r in latest_by_key(
        asyncio.run(read_to_end(kafka_bootstrap, run.prefix + "scores"))).items()}  # fmt: skip
    alerts = [json.loads(r.value)
              for r in asyncio.run(read_to_end(kafka_bootstrap, run.prefix + "alerts"))]  # fmt: skip
    return run, scores, alerts


def test_scores_snapshot_and_filters(settled):
    run, scores, _ = settled
    everyone = jsonl(efficacy(run, "scores", "--format", "jsonl"))
    assert {s["patient_id"]: s for s in everyone} == scores
    cohort = run.truth.patients[next(iter(scores))].cohort
    in_cohort = jsonl(efficacy(run, "scores", "--format", "jsonl", "--cohort", cohort))
    expected = {p for p, t in run.truth.patients.items() if t.cohort == cohort}
    assert {s["patient_id"] for s in in_cohort} == expected
    two = sorted(scores)[:2]
    picked = jsonl(efficacy(run, "scores", "--format", "jsonl",
                            "--patient", two[0], "--patient", two[1]))  # fmt: skip
    assert sorted(s["patient_id"] for s in picked) == two
    calls = {p: s["measures"][0]["classification"] for p, s in scores.items()}
    call = max(set(calls.values()), key=list(calls.values()).count)
    by_call = jsonl(efficacy(run, "scores", "--format", "jsonl", "--call", call))
    assert {s["patient_id"] for s in by_call} == {p for p, c in calls.items() if c == call}
    shown = efficacy(run, "scores", "--measure", MEASURE)
    lines = shown.stdout.splitlines()
    assert lines[0].split()[:4] == ["patient", "cohort", "measure", "call"]
    assert len(lines) == 1 + len(scores)
    row = next(line for line in lines if line.startswith(two[0] + " "))
    assert calls[two[0]] in row.split()


def test_alerts_snapshot_and_kind_filter(settled):
    run, _, alerts = settled
    printed = jsonl(efficacy(run, "alerts", "--format", "jsonl"))
    assert printed == alerts
    transitions = jsonl(efficacy(run, "alerts", "--format", "jsonl", "--kind", "transition"))
    assert transitions == [a for a in alerts if a["kind"] == "transition"]


def test_follow_prints_a_new_score(settled):
    run, scores, _ = settled
    env = {**os.environ, **run.env(Path("."))}
    follower = subprocess.Popen(
        [sys.executable, "-m", "cli.main", "scores", "--format", "jsonl", "--follow",
         "--seconds", "40", "--patient", "follow-probe"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    time.sleep(10)  # the follower's start and snapshot (nothing for this patient yet)
    probe = dict(next(iter(scores.values())), patient_id="follow-probe", event_id="probe-1")
    asyncio.run(produce(run.bootstrap, run.prefix + "scores",
                        [(b"follow-probe", json.dumps(probe).encode())]))  # fmt: skip
    out, err = follower.communicate(timeout=120)
    assert follower.returncode == 0, err[-2000:]
    assert [json.loads(line)["event_id"] for line in out.splitlines()] == ["probe-1"]
