"""The patients agent's per-batch work without Kafka: where a worker's time goes.

    python -m benchmarks.patients_path               # -> results/patients_path.json
    python -m benchmarks.patients_path --cprofile /tmp/patients.prof

Replays what ``PatientsService.process`` does for each batch of raw records
(streams/agents/patients.py), stage by stage and with the same functions, on a
simulated programme:

- ``parse``: ``validate_record`` of each raw record (streams.validation);
- ``load``: ``PatientRecord.model_validate_json`` of the touched patients' table values;
- ``apply``: ``apply_event`` per event (streams.patient_state);
- ``save``: ``model_dump_json`` of each touched record;
- ``evidence``: the ``EvidenceBatch`` message of the touched patients;
- ``score``: ``measure_scores`` of the touched patients (JAX mixture summaries);
- ``publish``: material-change test, ``efficacy_score`` and its JSON, record saved again.

Kafka's own costs (consumer, producer, faust's stream machinery, changelog) are
not here: benchmarks/throughput.py measures the whole worker. The population
posterior is a cheap fit (100 steps): its quality does not change the cost.
Timing: CPU seconds of this process (``time.process_time``: on shared cores wall
time measures the other jobs too; XLA's threads count), median over ``--repeats``
passes, each pass on fresh state.
"""

from __future__ import annotations

import argparse
import cProfile
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from benchmarks.common import machine, median, say, write_json

MEASURE = "resting_heart_rate"


def prepare(patients: int, obs: int):
    from model.config import SVIConfig
    from streams.app import measure_models
    from streams.catalogue import Catalogue
    from streams.population_book import PopulationModel
    from streams.posterior_feed import PosteriorBook
    from streams.programme import build_programme
    from streams.schemas import Origin
    from streams.settings import Settings

    catalogue = Catalogue.load()
    settings = Settings(max_age_days=36500.0)
    models = measure_models(catalogue, settings)
    programme = build_programme([MEASURE], num_patients=patients, num_cohorts=20,
                                obs_per_patient=obs, seed=3)  # fmt: skip
    raw = programme.send_order()
    messages = [
        (record.topic, record.key, record.value, Origin(topic=record.topic, partition=0,
                                                        offset=offset, timestamp=0.0))
        for offset, record in enumerate(raw)
    ]  # fmt: skip
    settings_and_catalogue = (settings, catalogue)
    ids = sorted(programme.truth.patients)
    stats = programme.expected_statistics(MEASURE, models[MEASURE], ids)
    cohorts = sorted({p.cohort for p in programme.truth.patients.values()})
    where = {c: g for g, c in enumerate(cohorts)}
    cohort = np.array([where[programme.truth.patients[p].cohort] for p in ids], dtype=np.int32)
    svi = SVIConfig(fresh_steps=100, update_steps=50)
    fit = PopulationModel(MEASURE, models[MEASURE], svi, max_rounds=0).fit(stats, cohort, cohorts)
    book = PosteriorBook()
    book.offer(fit.message)
    return settings_and_catalogue, models, book, messages


def one_pass(settings_and_catalogue, models, book, messages, batch_size: int) -> dict[str, float]:
    from model.config import DecisionRule
    from streams.patient_state import PatientRecord, apply_event, patient_evidence
    from streams.schemas import EvidenceBatch
    from streams.validation import validate_record

    settings, catalogue = settings_and_catalogue
    from streams.scoring import changed_materially, efficacy_score, measure_scores, published_of

    rule = DecisionRule()
    weights = {name: spec.weight for name, spec in catalogue.measures.items()}
    spec = catalogue.get(MEASURE)
    table: dict[str, bytes] = {}
    seconds: dict[str, float] = defaultdict(float)
    clock = time.process_time  # CPU time: the machine is shared, wall time is not ours
    for start in range(0, len(messages), batch_size):
        records: dict[str, PatientRecord] = {}
        touched: dict[str, set[str]] = defaultdict(set)
        for topic, key, value, origin in messages[start : start + batch_size]:
            t0 = clock()
            event = validate_record(topic, key, value, origin, catalogue, settings)
            t1 = clock()
            record = records.get(event.patient_id)
            fresh = record is None
            if fresh:
                raw = table.get(event.patient_id)
                record = PatientRecord.model_validate_json(raw) if raw else None
            t2 = clock()
            record, outcome = apply_event(record, event, models, copy=not fresh)
            t3 = clock()
            seconds["parse"] += t1 - t0
            seconds["load"] += t2 - t1
            seconds["apply"] += t3 - t2
            records[event.patient_id] = record
            touched[event.patient_id] |= outcome.touched
            if outcome.cohort_changed:
                touched[event.patient_id] |= set(record.measures)
        t0 = clock()
        for record in records.values():
            table[record.patient_id] = record.model_dump_json().encode()
        t1 = clock()
        items = [
            evidence
            for patient_id, measures in touched.items()
            for measure in measures
            if (evidence := patient_evidence(records[patient_id], measure, models[measure]))
        ]
        if items:
            EvidenceBatch(measure=MEASURE, items=items).model_dump_json().encode()
        t2 = clock()
        group = [records[p] for p in touched if touched[p] and records[p].cohort is not None]
        group = [r for r in group if MEASURE in r.measures]
        scores = (
            measure_scores(
                book[MEASURE],
                [r.measures[MEASURE] for r in group],
                [r.cohort for r in group],
                spec,
                models[MEASURE],
                rule,
            )
            if group
            else []
        )
        t3 = clock()
        for record, score in zip(group, scores, strict=True):
            if not changed_materially(record.published.get(MEASURE), score):
                continue
            record.published[MEASURE] = published_of(score)
            table[record.patient_id] = record.model_dump_json().encode()
            efficacy_score(record, [score], weights, rule).model_dump_json().encode()
        t4 = clock()
        seconds["save"] += t1 - t0
        seconds["evidence"] += t2 - t1
        seconds["score"] += t3 - t2
        seconds["publish"] += t4 - t3
    return dict(seconds)


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
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cprofile", type=Path, default=None, help="write pstats of one pass")
    parser.add_argument("--output", default="patients_path")
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
    catalogue, models, book, messages = prepare(args.patients, args.obs_per_patient)
    one_pass(catalogue, models, book, messages, args.batch_size)  # compile, warm caches
    passes = []
    for repeat in range(args.repeats):
        seconds = one_pass(catalogue, models, book, messages, args.batch_size)
        passes.append(seconds)
        total = sum(seconds.values())
        say(f"pass {repeat}: {len(messages) / total:,.0f} events/s "
            + ", ".join(f"{k} {v:.2f}s" for k, v in seconds.items()))  # fmt: skip
    stages = {k: median([p[k] for p in passes]) for k in passes[0]}
    total = median([sum(p.values()) for p in passes])
    if args.cprofile:
        profiler = cProfile.Profile(time.process_time)
        profiler.enable()
        one_pass(catalogue, models, book, messages, args.batch_size)
        profiler.disable()
        profiler.dump_stats(str(args.cprofile))
        say(f"cProfile of one pass in {args.cprofile}")
    result = {
        "events": len(messages),
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
