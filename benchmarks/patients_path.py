"""The patients agent's per-batch work without Kafka: where a worker's time goes.

    python -m benchmarks.patients_path               # -> results/patients_path.json
    python -m benchmarks.patients_path --cprofile /tmp/patients.prof

Runs the agent's own step (streams.patient_step.process_batch: what
``PatientsService.process`` calls for each batch of raw records) over a
simulated programme, with a dict as the table and a posterior present, and
reports the CPU time of each of its stages (``STAGES``):

- ``parse``: ``validate_record`` of each raw record (streams.validation);
- ``load``: ``PatientRecord.model_validate_json`` of the batch's patients' states;
- ``apply``: ``apply_event`` per event (streams.patient_state), with the
  readings' prior-data conflict inputs;
- ``score``: ``measure_score_rows`` of the touched patients (JAX mixture summaries)
  and their score messages;
- ``evidence``: the ``EvidenceBatch`` messages of the touched patients;
- ``save``: ``model_dump_json`` of each changed state.

The records go in the order read, each reading its patient's only one in a
step; ``--take N`` groups them by patient in takes of N records
(streams.patient_step.by_patient), as the worker groups a backlog's.

Kafka's own costs (consumer, producer, faust's stream machinery, changelog) are
not here: benchmarks/throughput.py measures the whole worker. The population
posterior is a cheap fit (100 steps): its quality does not change the cost.
Timing: CPU seconds of this process (``time.process_time``: on shared cores wall
time measures the other jobs too; XLA's threads count), median over ``--repeats``
passes, each pass on fresh state. The cyclic garbage collector is tuned as the
worker tunes it after start-up (``--gc worker``, the default:
cli.main.tune_garbage_collector); with CPython's defaults (``--gc default``) its
collections cost about a quarter of a pass, spread over whichever stages
allocate when they fall due.
"""

from __future__ import annotations

import argparse
import cProfile
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.common import machine, median, say, write_json
from streams.settings import Settings

MEASURE = "resting_heart_rate"
PARTITIONS = 4


def prepare(patients: int, obs: int):
    """The step's context (with a posterior) and the programme's raw records as
    a worker reads them (on their key's partition, per-partition offsets)."""
    from cli.programme import build_programme
    from model.config import SVIConfig
    from streams.app import measure_models
    from streams.catalogue import Catalogue
    from streams.patient_step import StepContext
    from streams.population_book import PopulationModel
    from streams.posterior_feed import PosteriorBook
    from streams.settings import Settings

    catalogue = Catalogue.load()
    settings = Settings(max_age_days=36500.0, partitions=PARTITIONS)
    models = measure_models(catalogue, settings)
    programme = build_programme([MEASURE], num_patients=patients, num_cohorts=20,
                                obs_per_patient=obs, seed=3)  # fmt: skip
    records = programme.as_read(settings.topic_prefix, PARTITIONS)
    ids = sorted(programme.truth.patients)
    stats = programme.expected_statistics(MEASURE, models[MEASURE], ids)
    cohorts = sorted({p.cohort for p in programme.truth.patients.values()})
    where = {c: g for g, c in enumerate(cohorts)}
    cohort = np.array([where[programme.truth.patients[p].cohort] for p in ids], dtype=np.int32)
    svi = SVIConfig(fresh_steps=100, update_steps=50)
    fit = PopulationModel(MEASURE, models[MEASURE], svi, max_rounds=0).fit(stats, cohort, cohorts)
    book = PosteriorBook()
    book.offer(fit.message)
    return StepContext(catalogue, models, book, settings), records


def one_pass(context, records, batch_size: int, batch_patients: int) -> dict[str, float]:
    """CPU seconds per stage of one pass over ``records`` on an empty table, in
    the worker's steps (streams.patient_step.step_bounds)."""
    from streams.patient_step import STAGES, RecordCache, batch_keys, process_batch, step_bounds

    table: dict[str, bytes] = {}
    cache = RecordCache(context.settings.state_cache_mb * 2**20)
    times = dict.fromkeys(STAGES, 0.0)
    start = 0
    for end in step_bounds([r.key for r in records], batch_size, batch_patients):
        batch = records[start:end]
        start = end
        states = {key: table.get(key) for key in batch_keys(batch)}
        saves, _ = process_batch(states, batch, context, times=times, cache=cache)
        table.update(saves)
    return times


def bisection_quantiles(means, sds, probs, steps: int):
    """The quantile method scoring used until stop 11 (the baseline): bisection
    of the mixture CDF on every component's ±12 sd, ``steps`` halvings."""
    import jax
    import jax.numpy as jnp
    from jax.scipy.special import ndtr

    low = jnp.min(means - 12.0 * sds, axis=0)
    high = jnp.max(means + 12.0 * sds, axis=0)
    low = jnp.broadcast_to(low, (probs.size, *low.shape))
    high = jnp.broadcast_to(high, low.shape)

    def step(_, bounds):
        lo, hi = bounds
        mid = 0.5 * (lo + hi)
        cdf = jnp.mean(ndtr((mid[:, None, :] - means[None]) / sds[None]), axis=1)
        below = cdf < probs[:, None]
        return jnp.where(below, mid, lo), jnp.where(below, hi, mid)

    low, high = jax.lax.fori_loop(0, steps, step, (low, high))
    return 0.5 * (low + high)


def quantile_comparison(draws: int = 400, patients: int = 2048, repeats: int = 5) -> dict:
    """model.scores.mixture_quantiles (safeguarded Newton) against bisection with
    36 steps (the old default) and 60 steps (the reference), on random mixtures
    shaped like the scores' (400 draws): CPU seconds per patient (median over
    ``repeats``, after compiling) and the largest difference in mixture sds."""
    from functools import partial

    import jax
    import jax.numpy as jnp

    from model.scores import mixture_quantiles

    rng = np.random.default_rng(0)
    centre = rng.normal(0.0, 1.0, patients)[None]
    spread = rng.choice([0.05, 0.3, 2.0], patients)[None]  # narrow, typical, multimodal
    means = jnp.asarray(centre + spread * rng.normal(size=(draws, patients)))
    sds = jnp.asarray(rng.uniform(0.2, 1.0, (draws, patients)))
    probs = jnp.asarray([0.05, 0.95])
    methods = {
        "newton": jax.jit(mixture_quantiles),
        "bisection_36": jax.jit(partial(bisection_quantiles, steps=36)),
        "bisection_60": jax.jit(partial(bisection_quantiles, steps=60)),
    }
    out: dict = {"draws": draws, "patients": patients}
    values = {}
    for name, method in methods.items():
        values[name] = np.asarray(method(means, sds, probs))  # compile
        times = []
        for _ in range(repeats):
            started = time.process_time()
            method(means, sds, probs).block_until_ready()
            times.append(time.process_time() - started)
        out[f"{name}_cpu_ms_per_patient"] = 1e3 * median(times) / patients
    mixture_sd = np.sqrt(np.mean(sds**2 + means**2, axis=0) - np.mean(means, axis=0) ** 2)
    for name in ("newton", "bisection_36"):
        error = np.abs(values[name] - values["bisection_60"]) / np.asarray(mixture_sd)
        out[f"{name}_max_error_in_sd"] = float(error.max())
    out["speedup_newton_vs_bisection_36"] = (
        out["bisection_36_cpu_ms_per_patient"] / out["newton_cpu_ms_per_patient"]
    )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--patients", type=int, default=2000)
    parser.add_argument("--obs-per-patient", type=int, default=10)
    defaults = Settings()
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size,
                        help="most records per step (EFFICACY_BATCH_SIZE)")  # fmt: skip
    parser.add_argument("--batch-patients", type=int, default=defaults.batch_patients,
                        help="most patients per step (EFFICACY_BATCH_PATIENTS)")  # fmt: skip
    parser.add_argument("--take", type=int, default=0,
                        help="group the records by patient in takes of this many, as the "
                             "worker groups what it has at hand (0: in the order read)")  # fmt: skip
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cprofile", type=Path, default=None, help="write pstats of one pass")
    parser.add_argument("--output", default="patients_path")
    parser.add_argument(
        "--gc",
        choices=("worker", "default"),
        default="worker",
        help="the garbage collector as the worker tunes it, or CPython's defaults",
    )
    parser.add_argument(
        "--quantiles-only",
        action="store_true",
        help="only compare the quantile methods (Newton against bisection)",
    )
    args = parser.parse_args(argv)
    where = machine()
    quantiles = quantile_comparison()
    say(f"mixture quantiles: {quantiles}")
    if args.quantiles_only:
        path = write_json("quantiles", {"quantiles": quantiles, "machine": where})
        say(f"wrote {path}")
        return 0
    say("preparing: programme, a cheap population fit (JAX compile)")
    context, messages = prepare(args.patients, args.obs_per_patient)
    if args.take:
        from streams.patient_step import by_patient

        messages = [record
                    for start in range(0, len(messages), args.take)
                    for record in by_patient(messages[start : start + args.take], lambda r: r.key)]  # fmt: skip
    if args.gc == "worker":
        from cli.main import tune_garbage_collector

        tune_garbage_collector()  # as the worker does once started
    one_pass(context, messages, args.batch_size, args.batch_patients)  # compile, warm caches
    passes = []
    for repeat in range(args.repeats):
        seconds = one_pass(context, messages, args.batch_size, args.batch_patients)
        passes.append(seconds)
        total = sum(seconds.values())
        say(f"pass {repeat}: {len(messages) / total:,.0f} events/s "
            + ", ".join(f"{k} {v:.2f}s" for k, v in seconds.items()))  # fmt: skip
    stages = {k: median([p[k] for p in passes]) for k in passes[0]}
    total = median([sum(p.values()) for p in passes])
    if args.cprofile:
        profiler = cProfile.Profile(time.process_time)
        profiler.enable()
        one_pass(context, messages, args.batch_size, args.batch_patients)
        profiler.disable()
        profiler.dump_stats(str(args.cprofile))
        say(f"cProfile of one pass in {args.cprofile}")
    result = {
        "events": len(messages),
        "batch_size": args.batch_size,
        "batch_patients": args.batch_patients,
        "patients_agent_events_per_s": len(messages) / total,
        "patients_agent_seconds": total,
        "stage_seconds": stages,
        "stage_fraction": {k: v / total for k, v in stages.items()},
        "stage_us_per_event": {k: 1e6 * v / len(messages) for k, v in stages.items()},
        "passes": passes,
        "quantiles": quantiles,
        "parameters": vars(args) | {"cprofile": str(args.cprofile)},
        "machine": where,
    }
    path = write_json(args.output, result)
    say(f"patients agent {result['patients_agent_events_per_s']:,.0f} events/s; wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
