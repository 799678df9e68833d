"""Wall time of a whole ``efficacy fit`` process on sleepstudy, cold and warm cache (issue 14, item 5).

    python -m benchmarks.fit_start                 # ~3 min -> results/fit_start.json
    python -m benchmarks.fit_start --repeats 3     # quicker
    python -m benchmarks.fit_start --source DIR --name fit_start_before   # another checkout

Runs the command a user runs (``python -m cli.main fit`` on
tests/data/sleepstudy/sleepstudy.csv, the command line of tests/test_fit_cli.py)
as a new process each time, in three modes:

- ``cold``: an empty compilation cache directory (a first run on a new machine);
- ``warm``: the directory one earlier run filled (every later run);
- ``no_cache``: ``--no-compilation-cache`` (compiles everything in the process).

Wall seconds (from start to exit) and CPU seconds (user + system of the child) of
each run, median, min and max over ``--repeats`` runs per mode. One more run per
mode counts what JAX did: XLA compilations (jax.monitoring's backend-compile
event, which a program loaded from the persistent cache also fires) and the
persistent cache's hits and misses (programs written). ``--source DIR`` runs the
checkout in DIR instead (e.g. ``git archive`` of main unpacked there) with this
environment; a checkout without the cache flags runs all modes as ``no_cache``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import machine, median, say, write_json

REPO = Path(__file__).resolve().parent.parent
SLEEPSTUDY = REPO / "tests" / "data" / "sleepstudy" / "sleepstudy.csv"
GOAL_WARM_SECONDS = 3.0
FIT_ARGS = [
    "fit", "--input", str(SLEEPSTUDY), "--patient", "Subject", "--exposure", "Days",
    "--outcome", "Reaction", "--direction", "lower", "--mcid", "5", "--seed", "1",
    "--min-unexposed", "1",
]  # fmt: skip
MODES = ("cold", "warm", "no_cache")

#: Runs cli.main with listeners on JAX's compile and cache events; prints the counts.
COUNTING_DRIVER = """
import json, sys, jax
from cli.main import main
counts = {"compilations": 0, "cache_hits": 0, "cache_misses": 0}
def on_duration(event, duration, **kwargs):
    if event == "/jax/core/compile/backend_compile_duration":
        counts["compilations"] += 1
def on_event(event, **kwargs):
    if event == "/jax/compilation_cache/cache_hits":
        counts["cache_hits"] += 1
    elif event == "/jax/compilation_cache/cache_misses":
        counts["cache_misses"] += 1
jax.monitoring.register_event_duration_secs_listener(on_duration)
jax.monitoring.register_event_listener(on_event)
code = main(sys.argv[1:])
print("COUNTS " + json.dumps(counts), file=sys.stderr)
sys.exit(code)
"""


def supports_cache_flags(source: Path) -> bool:
    return "--compilation-cache" in (source / "cli" / "fit.py").read_text()


def cache_args(mode: str, cache: Path, flags: bool) -> list[str]:
    if not flags:
        return []
    return ["--no-compilation-cache"] if mode == "no_cache" else ["--compilation-cache", str(cache)]


def run_once(command: list[str], source: Path, output: Path) -> dict[str, Any]:
    """One whole process: wall and CPU seconds (from the kernel's child rusage)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    result = subprocess.run(
        [*command, "--output", str(output)],
        cwd=source, capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall_s": wall, "cpu_s": cpu, "stderr": result.stderr}


def summary(values: list[float]) -> dict[str, float]:
    return {
        "median": round(median(values), 3),
        "min": round(min(values), 3),
        "max": round(max(values), 3),
    }


def measure(source: Path, repeats: int, workdir: Path) -> dict[str, Any]:
    flags = supports_cache_flags(source)
    python = [sys.executable]
    results: dict[str, Any] = {}
    output = workdir / "fit.json"
    warm_cache = workdir / "warm-cache"
    if flags:  # fill the warm cache once
        run_once([*python, "-m", "cli.main", *FIT_ARGS, "--compilation-cache", str(warm_cache)], source, output)  # fmt: skip
    for mode in MODES:
        walls, cpus = [], []
        for repeat in range(repeats + 1):  # the last run counts compilations
            cache = warm_cache
            if mode == "cold":
                cache = workdir / f"cold-{repeat}"
                shutil.rmtree(cache, ignore_errors=True)
            counting = repeat == repeats
            head = [*python, "-c", COUNTING_DRIVER] if counting else [*python, "-m", "cli.main"]
            run = run_once([*head, *FIT_ARGS, *cache_args(mode, cache, flags)], source, output)
            if counting:
                line = [x for x in run["stderr"].splitlines() if x.startswith("COUNTS ")][-1]
                results[mode] = {"counts": json.loads(line.removeprefix("COUNTS "))}
            else:
                walls.append(run["wall_s"])
                cpus.append(run["cpu_s"])
                say(f"{mode} run {repeat + 1}/{repeats}: {run['wall_s']:.2f} s wall, {run['cpu_s']:.2f} s CPU")  # fmt: skip
        results[mode].update(
            wall_s=summary(walls), cpu_s=summary(cpus), wall_s_runs=[round(w, 3) for w in walls]
        )
        say(f"{mode}: median {results[mode]['wall_s']['median']:.2f} s wall; {results[mode]['counts']}")  # fmt: skip
    population = json.loads(output.read_text())["population"]["effect"]
    return {
        "cache_flags": flags,
        "modes": results,
        "population_effect_of_last_run": population,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per mode")
    parser.add_argument("--source", type=Path, default=REPO, help="checkout to run")
    parser.add_argument("--name", default="fit_start", help="results/<name>.json")
    args = parser.parse_args(argv)
    source = args.source.resolve()
    say(f"efficacy fit of sleepstudy from {source}, {args.repeats} runs per mode")
    described = machine()  # the load average before the runs
    with tempfile.TemporaryDirectory(prefix="fit-start-") as workdir:
        measured = measure(source, args.repeats, Path(workdir))
    payload = {
        "machine": described,
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        "source": str(source),
        "command": " ".join(["python -m cli.main", *FIT_ARGS, "--output", "OUT"]),
        "repeats": args.repeats,
        "goal_warm_wall_s": GOAL_WARM_SECONDS,
        **measured,
    }
    path = write_json(args.name, payload)
    say(f"wrote {path}")


if __name__ == "__main__":
    main()
