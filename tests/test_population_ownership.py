"""A population update that finishes after its worker lost the measure in a
rebalance is not published (found by tests/test_scale_out.py on the real broker:
the old owner's first fit, tens of seconds of compilation, finished after the
new owner had started its own; both published version 1 with different
evidence, and every worker kept whichever it read first)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import faust
from prometheus_client import CollectorRegistry
from test_selection import STREAM_MEASURE, STREAM_MODEL, FakeTopic, _evidence

from model.config import SVIConfig
from monitoring.metrics import create_metrics
from streams.agents import population as population_agent
from streams.agents.population import PopulationService
from streams.catalogue import Catalogue
from streams.posterior_feed import PosteriorBook
from streams.schemas import EvidenceBatch, PopulationPosterior
from streams.settings import Settings
from streams.telemetry import Telemetry

FAST_SVI = SVIConfig(fresh_steps=50, update_steps=50, num_particles=1)


def population_service(
    name: str,
    models: dict | None = None,
    settings: Settings | None = None,
    topic: FakeTopic | None = None,
    svi: SVIConfig | None = None,
) -> PopulationService:
    """A PopulationService on an app that never connects: ``topic`` receives its
    posteriors (none: no topics), metrics on a registry of its own."""
    app = faust.App(name, broker="kafka://127.0.0.1:9", web_enabled=False)
    topics = SimpleNamespace() if topic is None else SimpleNamespace(population_posterior=topic)
    return PopulationService(
        app,
        topics,  # type: ignore[arg-type]
        models or {STREAM_MEASURE: STREAM_MODEL},
        PosteriorBook(),
        settings or Settings(),
        Telemetry(create_metrics(CollectorRegistry())),
        svi=svi,
    )


def test_an_update_finished_after_losing_the_measure_is_not_published():
    topic = FakeTopic()
    service = population_service("ownership-test", topic=topic, svi=FAST_SVI)
    evidence = _evidence(5, num_patients=20, num_cohorts=2, obs_per_patient=8)
    owner = {"now": True}
    service.owns = lambda measure: owner["now"]  # type: ignore[method-assign]
    book = service.book(STREAM_MEASURE)
    service.take(EvidenceBatch(measure=STREAM_MEASURE, items=evidence[:10]))
    asyncio.run(service.fit(STREAM_MEASURE, book))
    [(key, value)] = topic.sent  # the owner publishes
    assert key == STREAM_MEASURE.encode()
    assert PopulationPosterior.model_validate_json(value).version == 1
    # A rebalance moves the measure while the next fit runs: dropped.
    service.take(EvidenceBatch(measure=STREAM_MEASURE, items=evidence[10:]))
    owner["now"] = False
    asyncio.run(service.fit(STREAM_MEASURE, book))
    assert len(topic.sent) == 1


def test_a_new_owner_rebuilds_its_book_without_blocking_the_loop(monkeypatch):
    """The book is rebuilt from the table in chunks with yields between them
    (thirty chunks here): a 50 ms ticker keeps running (largest lag far below the
    whole rebuild),
    the rebuilt book holds every patient's table value, and an evidence batch
    taken during the rebuild is applied after it (newer than the table value)."""
    service = population_service("rebuild-test")
    evidence = _evidence(6, num_patients=3000, num_cohorts=4, obs_per_patient=4)
    monkeypatch.setattr(population_agent, "REBUILD_CHUNK", 100)
    for item in evidence:  # what recovery leaves in the table (no changelog here)
        service.table.data[f"{STREAM_MEASURE}/{item.patient_id}"] = item.model_dump_json().encode()
    doubled = [[2.0 * g for g in row] for row in evidence[0].gram]  # as if more readings came
    newer = evidence[0].model_copy(update={"gram": doubled})

    async def scenario() -> tuple[float, float]:
        lags: list[float] = []
        loop = asyncio.get_running_loop()

        async def ticker() -> None:
            while True:
                started = loop.time()
                await asyncio.sleep(0.05)
                lags.append(loop.time() - started - 0.05)

        async def arrives() -> None:
            await asyncio.sleep(0)  # once the rebuild has started
            service.take(EvidenceBatch(measure=STREAM_MEASURE, items=[newer]))

        tick = asyncio.create_task(ticker())
        await asyncio.sleep(0.06)
        started = loop.time()
        await asyncio.gather(service.rebuild_book(STREAM_MEASURE), arrives())
        took = loop.time() - started
        tick.cancel()
        return took, max(lags)

    took, worst = asyncio.run(scenario())
    print(f"rebuilt 3000 patients in {took:.2f} s, largest loop lag {worst:.3f} s")
    book = service.books[STREAM_MEASURE]
    assert book.num_patients == len(evidence)
    stats, _, _ = book.snapshot()
    weights = sorted(float(w) for w in stats.gram[: len(evidence), 0, 0])
    expected = sorted([newer.gram[0][0]] + [e.gram[0][0] for e in evidence[1:]])
    assert weights == expected  # every table value, the newer batch on top
    assert worst < took / 2


def test_evidence_counting_fewer_readings_than_the_book_holds_is_a_stale_copy():
    """PopulationBook.put: a patient's readings only accumulate, so evidence with
    fewer of them (an earlier owner's, delivered after the new owner's around a
    rebalance, seen as a posterior one reading short in tests/test_scale_out.py)
    leaves the book as it was; as many readings (an enrolment change) replace it."""
    from streams.population_book import PopulationBook

    newer, older = _evidence(7, num_patients=1, num_cohorts=1, obs_per_patient=8)[0], None
    older = newer.model_copy(update={"count_exposed": newer.count_exposed - 1,
                                     "gram": [[0.0] * len(row) for row in newer.gram]})  # fmt: skip
    book = PopulationBook(STREAM_MEASURE, STREAM_MODEL)
    assert book.put(newer)
    before, _, _ = book.snapshot()
    assert not book.put(older)
    after, _, _ = book.snapshot()
    assert (after.gram == before.gram).all() and book.changes_since_fit == 1
    moved = newer.model_copy(update={"cohort": "elsewhere"})
    assert book.put(moved) and book.snapshot()[2] == [newer.cohort, "elsewhere"]


def test_each_measure_is_fitted_before_the_next_book_is_rebuilt(monkeypatch):
    """After a start, the first posterior waits for one book's rebuild, not for
    every measure's: the tick rebuilds and fits measure by measure, newly owned
    measures with a published posterior first."""
    measures = ["first", "second"]
    service = population_service("tick-order-test", dict.fromkeys(measures, STREAM_MODEL))
    service.owns = lambda measure: True  # type: ignore[method-assign]
    # "second" has a published posterior (a restart: its fit is warm), "first" not.
    service.posteriors.messages["second"] = None  # type: ignore[assignment]
    evidence = _evidence(8, num_patients=20, num_cohorts=2, obs_per_patient=4)
    for measure in measures:
        for item in evidence:
            value = item.model_copy(update={"measure": measure}).model_dump_json().encode()
            service.table.data[f"{measure}/{item.patient_id}"] = value
    calls: list[tuple[str, str]] = []
    rebuild = service.rebuild_book

    async def rebuild_and_note(measure: str) -> None:
        await rebuild(measure)
        calls.append(("rebuild", measure, service.taking_over))

    async def note_fit(measure: str, book) -> None:
        assert book.num_patients == len(evidence)
        calls.append(("fit", measure, service.taking_over))
        book.changes_since_fit = 0

    monkeypatch.setattr(service, "rebuild_book", rebuild_and_note)
    monkeypatch.setattr(service, "fit", note_fit)
    asyncio.run(service._tick())
    # The warm measure first, taking over (rescoring waits: PatientsService.paused)
    # until it is fitted; the cold one's first fit does not hold rescoring up.
    assert calls == [("rebuild", "second", True), ("fit", "second", True),
                     ("rebuild", "first", False), ("fit", "first", False)]  # fmt: skip
    assert not service.taking_over
    service.books["first"].changes_since_fit = 1  # new evidence, nothing newly owned
    asyncio.run(service._tick())
    assert calls[4:] == [("fit", "first", False)] and not service.taking_over


def test_a_restarted_workers_fit_loads_its_programs_instead_of_tracing_them(tmp_path):
    """The population agent's fitters keep their traced programs beside the
    compilation cache (model.exported): a second worker process on the same
    data directory fits from them, traces nothing and publishes the same
    posterior."""
    evidence = _evidence(9, num_patients=20, num_cohorts=2, obs_per_patient=8)

    def first_fit() -> tuple[PopulationService, PopulationPosterior]:
        topic = FakeTopic()
        service = population_service(
            "export-test", settings=Settings(compilation_cache_dir=tmp_path), topic=topic,
            svi=FAST_SVI,
        )  # fmt: skip
        service.owns = lambda measure: True  # type: ignore[method-assign]
        service.take(EvidenceBatch(measure=STREAM_MEASURE, items=evidence))
        asyncio.run(service.fit(STREAM_MEASURE, service.book(STREAM_MEASURE)))
        [(_, value)] = topic.sent
        return service, PopulationPosterior.model_validate_json(value)

    first, posterior = first_fit()
    cache = first.fitters.export_cache
    assert cache is not None and cache.directory.parent == tmp_path
    assert cache.misses > 0 and cache.hits == 0
    restarted, again = first_fit()
    loaded = restarted.fitters.export_cache
    assert loaded is not None and loaded.misses == 0 and loaded.hits == cache.misses
    (fitter,) = restarted.fitters._fitters.values()
    assert fitter.trace_count == 0
    assert again.summary["effect"].mean == posterior.summary["effect"].mean
    assert again.summary["effect"].sd == posterior.summary["effect"].sd


def window_model():
    """The stream measure's model with a recent-window fit (7-day half-life)."""
    return (
        Catalogue.load()
        .get(STREAM_MEASURE)
        .model_config_for(
            time_origin_days=0.0, time_scale_days=30.0, half_life_days=None,
            recent_half_life_days=7.0,
        )
    )  # fmt: skip


def test_a_new_owner_publishes_before_its_cold_recent_window_fit():
    """A new owner (a restart, a rebalance) continues the published posterior
    warm, but its recent-window fit starts cold (a minute at 100k patients):
    the posterior goes out without the window comparison, the window fit runs
    after the tick's posteriors (``warm_up_recent_fits``), and the next update
    compares windows again. A first owner fits both windows together."""
    model = window_model()
    evidence = [
        item.model_copy(update={"recent_gram": item.gram})  # every reading in the window
        for item in _evidence(9, num_patients=24, num_cohorts=2, obs_per_patient=8)
    ]
    published = FakeTopic()
    first = population_service(
        "first-owner", {STREAM_MEASURE: model}, topic=published, svi=FAST_SVI
    )
    first.owns = lambda measure: True  # type: ignore[method-assign]
    first.take(EvidenceBatch(measure=STREAM_MEASURE, items=evidence[:16]))
    asyncio.run(first.fit(STREAM_MEASURE, first.book(STREAM_MEASURE)))
    v1 = PopulationPosterior.model_validate_json(published.sent[-1][1])
    assert v1.version == 1 and "window_shift" in v1.drift

    service = population_service(
        "new-owner", {STREAM_MEASURE: model}, topic=published, svi=FAST_SVI
    )
    service.owns = lambda measure: True  # type: ignore[method-assign]
    service.posteriors.messages[STREAM_MEASURE] = v1
    service.take(EvidenceBatch(measure=STREAM_MEASURE, items=evidence[:20]))
    asyncio.run(service.fit(STREAM_MEASURE, service.book(STREAM_MEASURE)))
    v2 = PopulationPosterior.model_validate_json(published.sent[-1][1])
    assert v2.version == 2 and "window_shift" not in v2.drift
    pending = service._recent_warmups[STREAM_MEASURE]
    assert service.recent_fits[STREAM_MEASURE].state is None  # published before it
    # A worker that stops meanwhile abandons the window fit after its first chunk
    # (it waits for its fit thread, and this fit's result is never published).
    running_app = service.app
    service.app = SimpleNamespace(should_stop=True)  # type: ignore[assignment]
    asyncio.run(service.warm_up_recent_fits())
    assert service.recent_fits[STREAM_MEASURE].state is None
    service.app = running_app
    service._recent_warmups[STREAM_MEASURE] = pending
    asyncio.run(service.warm_up_recent_fits())
    assert service.recent_fits[STREAM_MEASURE].state is not None
    service.take(EvidenceBatch(measure=STREAM_MEASURE, items=evidence[20:]))
    asyncio.run(service.fit(STREAM_MEASURE, service.book(STREAM_MEASURE)))
    v3 = PopulationPosterior.model_validate_json(published.sent[-1][1])
    assert v3.version == 3 and "window_shift" in v3.drift


def test_a_new_owner_warms_up_one_recent_window_fit_a_tick():
    """Each recent-window fit a new owner's posteriors went out without is cold:
    one a tick (``warm_up_recent_fits``), so the all-time updates of the next
    tick's new evidence wait for one of them, not for all."""
    model = window_model()
    measures = [STREAM_MEASURE, "second"]
    evidence = [
        item.model_copy(update={"recent_gram": item.gram})
        for item in _evidence(9, num_patients=20, num_cohorts=2, obs_per_patient=8)
    ]
    published = FakeTopic()
    first = population_service(
        "first-owner-2", dict.fromkeys(measures, model), topic=published, svi=FAST_SVI
    )
    first.owns = lambda measure: True  # type: ignore[method-assign]
    service = population_service(
        "new-owner-2", dict.fromkeys(measures, model), topic=published, svi=FAST_SVI
    )
    service.owns = lambda measure: True  # type: ignore[method-assign]
    for measure in measures:
        items = [item.model_copy(update={"measure": measure}) for item in evidence]
        first.take(EvidenceBatch(measure=measure, items=items[:16]))
        asyncio.run(first.fit(measure, first.book(measure)))
        service.posteriors.messages[measure] = PopulationPosterior.model_validate_json(
            published.sent[-1][1]
        )
        service.take(EvidenceBatch(measure=measure, items=items))
        asyncio.run(service.fit(measure, service.book(measure)))
    assert set(service._recent_warmups) == set(measures)
    asyncio.run(service.warm_up_recent_fits())
    [waiting] = service._recent_warmups
    fitted = [m for m in measures if service.recent_fits[m].state is not None]
    assert fitted == [m for m in measures if m != waiting]
    asyncio.run(service.warm_up_recent_fits())
    assert not service._recent_warmups
    assert all(service.recent_fits[m].state is not None for m in measures)
