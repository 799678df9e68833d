"""streams.posterior_feed on the real broker: a worker starting on a topic that
already holds several versions of a measure's posterior rescores once, under the
newest (forced if any version on the way asked for it), then follows new
versions one by one."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path

import pytest

from cli.kafka_io import produce
from streams.posterior_feed import PosteriorBook, follow_posteriors
from streams.schemas import PopulationPosterior
from streams.settings import Settings

pytestmark = pytest.mark.kafka

EXAMPLES = Path(__file__).resolve().parents[1] / "streams" / "schema_examples.json"


def posterior(measure: str, version: int, rescore: bool) -> bytes:
    example = json.loads(EXAMPLES.read_text())["population-posterior"][0]
    example.update(measure=measure, version=version, rescore=rescore)
    return PopulationPosterior.model_validate(example).model_dump_json().encode()


def test_catching_up_rescores_once_per_measure_under_its_newest_version(kafka_bootstrap):
    settings = Settings(
        bootstrap_servers=kafka_bootstrap, topic_prefix=f"feed-{uuid.uuid4().hex[:8]}."
    )
    topic = settings.topic("population-posterior")
    published = [("hba1c", 1, True), ("hba1c", 2, False), ("hba1c", 3, False), ("phq9", 1, False)]

    async def scenario() -> tuple[list, list]:
        await produce(
            kafka_bootstrap, topic, [(m.encode(), posterior(m, v, r)) for m, v, r in published]
        )
        calls: list[tuple[str, int, bool]] = []
        book, stopping = PosteriorBook(), asyncio.Event()

        async def on_new(message: PopulationPosterior) -> None:
            calls.append((message.measure, message.version, message.rescore))

        feed = asyncio.create_task(follow_posteriors(settings, book, on_new, stopping))
        for _ in range(600):  # until caught up (60 s at most)
            if book.caught_up and len(calls) >= 2:
                break
            await asyncio.sleep(0.1)
        caught_up = sorted(calls)
        await produce(kafka_bootstrap, topic, [(b"hba1c", posterior("hba1c", 4, False))])
        for _ in range(600):
            if len(calls) > len(caught_up):
                break
            await asyncio.sleep(0.1)
        stopping.set()
        await asyncio.wait_for(feed, 30)
        return caught_up, calls[len(caught_up) :]

    caught_up, live = asyncio.run(scenario())
    # v1 asked for every score to be republished; v3 is the version to score under.
    assert caught_up == [("hba1c", 3, True), ("phq9", 1, False)]
    assert live == [("hba1c", 4, False)]
