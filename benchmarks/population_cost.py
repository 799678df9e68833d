"""Cost of one warm population update against the number of patients (issue 3, item 7).

For 1k, 10k, 100k and 1M patients: simulate a programme, reduce it to per-patient
statistics (model.evidence, in chunks of events: statistics are additive), pad
them (model.population.pad_evidence) and time ``PopulationFitter.update`` with the
default ``update_steps`` from a warm state. Compilation (the first call for a
padded shape) is reported apart from the warm time; warm times are medians over
repeats. Goal from the issue: <= 0.5 s warm at 100k patients, growing linearly.

Each size runs in its own child process, so compile times are cold and the peak
memory (VmHWM, reset after the simulation) is that size's alone.

Run ``python -m benchmarks.population_cost`` (``--max-patients 100000`` to stop
earlier). Progress goes to stderr; results to benchmarks/results/population_cost.json.

``--covariates Q`` (issue 15) runs a comparison instead, in one child process at
``--compare-patients`` (default 100k): the same simulated statistics without
patient covariates and with Q standardised ones (a random normal design, padded
with ``pad_evidence(..., covariates)``), a fitter for each, the first (compiling)
update of each, then warm updates alternating between the two so both see the
same background load. It reports each median, the ratio of the medians (with /
without) and the median of the per-pair ratios; results to
benchmarks/results/population_cost_covariates.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from benchmarks.common import machine, median, peak_rss_mb, say, timed, write_json
from model.config import ModelConfig, SVIConfig
from model.evidence import add_events, empty_stats
from model.offline import model_config_for
from model.population import CHUNK_STEPS, Evidence, PopulationFitter, pad_evidence
from model.simulate import ProgrammeSpec, simulate

SIZES = (1_000, 10_000, 100_000, 1_000_000)
GOAL_SECONDS_AT_100K = 0.5
OBS_PER_PATIENT = 12  # the update's cost does not depend on it; it only slows the simulation
EVENT_CHUNK = 2_000_000


def simulated_evidence(num_patients: int, seed: int = 0) -> tuple[Evidence, Any]:
    """Padded evidence of a simulated programme (20 cohorts) and its ModelConfig."""
    stats, cohort, num_cohorts, config = simulated_stats(num_patients, seed)
    return pad_evidence(stats, cohort, num_cohorts), config


def simulated_stats(num_patients: int, seed: int = 0) -> tuple[Any, np.ndarray, int, ModelConfig]:
    """Per-patient statistics of a simulated programme (20 cohorts), each patient's
    cohort, the cohort count and the ModelConfig (no covariates)."""
    spec = ProgrammeSpec(num_patients=num_patients, num_cohorts=20, obs_per_patient=OBS_PER_PATIENT)
    events = simulate(spec, seed=seed).events
    config = model_config_for(events, time_trend=True, cohort_level=True)
    stats = empty_stats(events.num_patients, config)
    for start in range(0, events.patient.size, EVENT_CHUNK):
        rows = slice(start, start + EVENT_CHUNK)
        stats = add_events(
            stats,
            events.patient[rows],
            events.exposure[rows],
            events.time[rows],
            events.outcome[rows],
            config,
        )
    return stats, events.cohort_of_patient, events.num_cohorts, config


def with_random_covariates(
    config: ModelConfig, num_patients: int, num_covariates: int, seed: int = 1
) -> tuple[ModelConfig, np.ndarray]:
    """The config with ``num_covariates`` patient covariates x1.. and their
    standardised values, a random normal design (P, q). The update's cost does not
    depend on the values, only on their count."""
    design = np.random.default_rng(seed).standard_normal((num_patients, num_covariates))
    std = config.standardization.with_covariates(design, None)
    names = tuple(f"x{k + 1}" for k in range(num_covariates))
    config = config.model_copy(update={"covariates": names, "standardization": std})
    return config, std.covariates(design)


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process (Linux ≥ 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _rss_mb(field: str) -> float | None:
    """VmRSS / VmHWM of this process in MB, from /proc (None where unavailable)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


def measure(num_patients: int, repeats: int) -> dict[str, Any]:
    """Compile and warm timings of one population update at one size (child process)."""
    say(f"{num_patients:,} patients: simulating statistics")
    (evidence, config), simulate_seconds = timed(lambda: simulated_evidence(num_patients))
    jax.block_until_ready(evidence.gram)
    gc.collect()
    peak_reset = _reset_peak_rss()
    rss_before = _rss_mb("VmRSS")

    svi_config = SVIConfig()
    fitter = PopulationFitter(config, svi_config)
    state, init_seconds = timed(lambda: fitter.init(jax.random.PRNGKey(0), evidence))
    # Mark the state as already fitted so update() takes the warm path (update_steps,
    # update_particles); the cost of a step does not depend on where q currently is.
    state = state._replace(total_steps=svi_config.fresh_steps, version=1)

    def update(k: int) -> None:
        nonlocal state
        state, _info = fitter.update(state, evidence, jax.random.PRNGKey(k))

    _, first_seconds = timed(lambda: update(1))  # compiles the warm chunk for this shape
    traces = fitter.trace_count
    say(f"{num_patients:,} patients: first update (with compilation) {first_seconds:.2f} s")
    warm = []
    for k in range(repeats):
        _, seconds = timed(lambda k=k: update(2 + k))
        warm.append(seconds)
    assert fitter.trace_count == traces, "a warm update recompiled"
    warm_median = median(warm)
    padded = int(evidence.gram.shape[0])
    steps = max(1, -(-svi_config.update_steps // CHUNK_STEPS)) * CHUNK_STEPS
    result = {
        "patients": num_patients,
        "padded_patients": padded,
        "update_steps": steps,
        "update_particles": svi_config.update_particles,
        "repeats": repeats,
        "simulate_seconds": simulate_seconds,
        "init_seconds": init_seconds,
        "first_update_seconds": first_seconds,
        "compile_seconds": first_seconds - warm_median,
        "warm_seconds_median": warm_median,
        "warm_seconds_min": min(warm),
        "warm_seconds_max": max(warm),
        "warm_seconds_all": warm,
        "step_ms_median": warm_median / steps * 1e3,
        "ns_per_patient_step": warm_median / steps / num_patients * 1e9,
        "evidence_mb": evidence.gram.nbytes / 2**20,
        "rss_before_fit_mb": rss_before,
        "peak_rss_during_fit_mb": _rss_mb("VmHWM") if peak_reset else None,
        "peak_rss_process_mb": peak_rss_mb(),
    }
    say(
        f"{num_patients:,} patients: warm update {warm_median:.3f} s (median of {repeats}), "
        f"compile {result['compile_seconds']:.1f} s, peak RSS "
        f"{result['peak_rss_during_fit_mb'] or result['peak_rss_process_mb']:.0f} MB"
    )
    return result


def measure_covariates(num_patients: int, num_covariates: int, repeats: int) -> dict[str, Any]:
    """Warm update without and with ``num_covariates`` patient covariates, in one
    process, warm repeats alternating (child process)."""
    say(f"{num_patients:,} patients: simulating statistics")
    stats, cohort, num_cohorts, config = simulated_stats(num_patients)
    config_cov, covariates = with_random_covariates(config, num_patients, num_covariates)
    variants = {
        "without": (config, pad_evidence(stats, cohort, num_cohorts)),
        "with": (config_cov, pad_evidence(stats, cohort, num_cohorts, covariates)),
    }
    padded = int(variants["without"][1].gram.shape[0])
    svi_config = SVIConfig()
    fitters, states, first, updates = {}, {}, {}, {}
    for name, (model_config, evidence) in variants.items():
        jax.block_until_ready(evidence.gram)
        fitter = PopulationFitter(model_config, svi_config)
        state, init_seconds = timed(lambda f=fitter, e=evidence: f.init(jax.random.PRNGKey(0), e))
        # Warm path (update_steps, update_particles), as in measure().
        states[name] = state._replace(total_steps=svi_config.fresh_steps, version=1)
        fitters[name] = fitter

        def update(k: int, name: str = name, evidence: Evidence = evidence) -> None:
            states[name], _info = fitters[name].update(
                states[name], evidence, jax.random.PRNGKey(k)
            )

        _, seconds = timed(lambda update=update: update(1))  # compiles this variant's chunk
        first[name] = {"init_seconds": init_seconds, "first_update_seconds": seconds}
        updates[name] = (update, fitter.trace_count)
        say(f"{name} covariates: init {init_seconds:.1f} s, first update {seconds:.2f} s")
    warm: dict[str, list[float]] = {"without": [], "with": []}
    for k in range(repeats):
        # Alternate which goes first so neither always follows the other.
        order = ("without", "with") if k % 2 == 0 else ("with", "without")
        for name in order:
            update, _traces = updates[name]
            _, seconds = timed(lambda update=update, k=k: update(2 + k))
            warm[name].append(seconds)
        say(
            f"repeat {k + 1}/{repeats}: without {warm['without'][-1]:.3f} s, "
            f"with {warm['with'][-1]:.3f} s"
        )
    for name, (_update, traces) in updates.items():
        assert fitters[name].trace_count == traces, f"a warm update recompiled ({name})"
    steps = max(1, -(-svi_config.update_steps // CHUNK_STEPS)) * CHUNK_STEPS
    rows = {}
    for name in ("without", "with"):
        warm_median = median(warm[name])
        rows[name] = {
            "covariates": 0 if name == "without" else num_covariates,
            **first[name],
            "compile_seconds": first[name]["first_update_seconds"] - warm_median,
            "warm_seconds_median": warm_median,
            "warm_seconds_min": min(warm[name]),
            "warm_seconds_max": max(warm[name]),
            "warm_seconds_all": warm[name],
            "step_ms_median": warm_median / steps * 1e3,
            "ns_per_patient_step": warm_median / steps / num_patients * 1e9,
        }
    paired = [w / wo for w, wo in zip(warm["with"], warm["without"], strict=True)]
    return {
        "patients": num_patients,
        "padded_patients": padded,
        "num_covariates": num_covariates,
        "update_steps": steps,
        "update_particles": svi_config.update_particles,
        "repeats": repeats,
        "without": rows["without"],
        "with": rows["with"],
        "ratio_of_medians": rows["with"]["warm_seconds_median"]
        / rows["without"]["warm_seconds_median"],
        "paired_ratios": paired,
        "paired_ratio_median": median(paired),
        "paired_ratio_min": min(paired),
        "paired_ratio_max": max(paired),
        "peak_rss_process_mb": peak_rss_mb(),
    }


def _child(num_patients: int, repeats: int) -> dict[str, Any]:
    """Run measure() for one size in a fresh interpreter; its JSON comes on stdout."""
    command = [
        sys.executable,
        "-m",
        "benchmarks.population_cost",
        "--child",
        str(num_patients),
        "--repeats",
        str(repeats),
    ]
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(done.stdout)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.population_cost", description=__doc__
    )
    parser.add_argument(
        "--max-patients", type=int, default=SIZES[-1], help="largest size to run (default 1M)"
    )
    parser.add_argument("--repeats", type=int, default=7, help="warm updates timed per size")
    parser.add_argument("--quick", action="store_true", help="up to 100k patients, 3 repeats")
    parser.add_argument(
        "--output",
        help="results/<OUTPUT>.json (default population_cost, or population_cost_quick with --quick)",
    )
    parser.add_argument(
        "--covariates",
        type=int,
        default=0,
        help="compare a warm update without and with this many patient covariates (issue 15)",
    )
    parser.add_argument(
        "--compare-patients",
        type=int,
        default=100_000,
        help="patients of the --covariates comparison (default 100k)",
    )
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.covariates:
        return compare_covariates(args)
    args.output = args.output or ("population_cost_quick" if args.quick else "population_cost")
    if args.child:
        json.dump(measure(args.child, args.repeats), sys.stdout)
        return 0
    max_patients = min(args.max_patients, 100_000) if args.quick else args.max_patients
    repeats = 3 if args.quick else args.repeats
    started = time.perf_counter()
    rows = []
    for size in (s for s in SIZES if s <= max_patients):
        rows.append(_child(size, repeats))
    base = next((r for r in rows if r["patients"] == 100_000), rows[-1])
    for row in rows:
        row["warm_over_100k_per_patient"] = (row["warm_seconds_median"] / row["patients"]) / (
            base["warm_seconds_median"] / base["patients"]
        )
    at_100k = next((r["warm_seconds_median"] for r in rows if r["patients"] == 100_000), None)
    results = {
        "benchmark": "population_cost",
        "machine": machine(),
        "svi_config": SVIConfig().model_dump(),
        "goal": {"warm_seconds_at_100k_max": GOAL_SECONDS_AT_100K, "growth": "linear"},
        "warm_seconds_at_100k": at_100k,
        "meets_goal_at_100k": None if at_100k is None else at_100k <= GOAL_SECONDS_AT_100K,
        "sizes": rows,
        "total_seconds": time.perf_counter() - started,
    }
    path = write_json(args.output, results)
    print(
        f"{'patients':>10} {'warm s':>8} {'compile s':>10} {'ns/patient/step':>16} {'peak MB':>8}"
    )
    for row in rows:
        peak = row["peak_rss_during_fit_mb"] or row["peak_rss_process_mb"]
        print(
            f"{row['patients']:>10,} {row['warm_seconds_median']:>8.3f} "
            f"{row['compile_seconds']:>10.1f} {row['ns_per_patient_step']:>16.1f} {peak:>8.0f}"
        )
    say(f"wrote {path}")
    return 0


def compare_covariates(args: argparse.Namespace) -> int:
    """``--covariates Q``: the comparison in a child process, then the table."""
    if args.child:
        result = measure_covariates(args.compare_patients, args.covariates, args.repeats)
        json.dump(result, sys.stdout)
        return 0
    started = time.perf_counter()
    command = [
        sys.executable, "-m", "benchmarks.population_cost", "--child", "1",
        "--covariates", str(args.covariates), "--compare-patients", str(args.compare_patients),
        "--repeats", str(args.repeats),
    ]  # fmt: skip
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=True)
    result = json.loads(done.stdout)
    results = {
        "benchmark": "population_cost_covariates",
        "machine": machine(),
        "svi_config": SVIConfig().model_dump(),
        **result,
        "total_seconds": time.perf_counter() - started,
    }
    path = write_json(args.output or "population_cost_covariates", results)
    print(f"{'covariates':>10} {'warm s':>8} {'min-max s':>13} {'compile s':>10} {'ns/p/step':>10}")
    for name in ("without", "with"):
        row = result[name]
        print(
            f"{row['covariates']:>10} {row['warm_seconds_median']:>8.3f} "
            f"{row['warm_seconds_min']:>6.3f}-{row['warm_seconds_max']:<6.3f} "
            f"{row['compile_seconds']:>10.1f} {row['ns_per_patient_step']:>10.1f}"
        )
    print(
        f"ratio with/without: {result['ratio_of_medians']:.3f} (medians), "
        f"{result['paired_ratio_median']:.3f} (median of {args.repeats} paired ratios, "
        f"{result['paired_ratio_min']:.3f}-{result['paired_ratio_max']:.3f})"
    )
    say(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
