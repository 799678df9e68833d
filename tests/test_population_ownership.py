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
from streams.agents.population import PopulationService
from streams.posterior_feed import PosteriorBook
from streams.schemas import EvidenceBatch, PopulationPosterior
from streams.settings import Settings
from streams.telemetry import Telemetry


def test_an_update_finished_after_losing_the_measure_is_not_published():
    app = faust.App("ownership-test", broker="kafka://127.0.0.1:9", web_enabled=False)
    topic = FakeTopic()
    service = PopulationService(
        app,
        SimpleNamespace(population_posterior=topic),  # type: ignore[arg-type]
        {STREAM_MEASURE: STREAM_MODEL},
        PosteriorBook(),
        Settings(),
        Telemetry(create_metrics(CollectorRegistry())),
        svi=SVIConfig(fresh_steps=50, update_steps=50, num_particles=1),
    )
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
