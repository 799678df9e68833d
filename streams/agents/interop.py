"""interop: FHIR Observations and Open mHealth data points in, our readings out.

Reads the fhir-observations and omh-datapoints topics, turns each record into
the readings it holds (streams.interop, pure) and publishes each on its source
topic (wearables, labs, pros) keyed by patient id, where the patients agent
takes it like any producer's reading. A record, or a part of it, that cannot
be used goes to the dead-letter topic with its original bytes, origin and
reason (streams.validation.dead_letter), counted by reason. Records are keyed
by anything: the patient id comes from the record.
"""

from __future__ import annotations

import logging

import faust

from streams.catalogue import Catalogue
from streams.interop import fhir, open_mhealth
from streams.interop.readings import Outcome, Parser, Reading, readings
from streams.schemas import Origin, json_bytes
from streams.settings import Settings
from streams.telemetry import Telemetry
from streams.topics import Topics
from streams.validation import Rejected, dead_letter

log = logging.getLogger(__name__)


def register(
    app: faust.App, topics: Topics, catalogue: Catalogue, settings: Settings, telemetry: Telemetry
) -> None:
    """One agent per interoperable topic."""
    source_topics = {settings.source_of(t.get_topic_name()): t for t in topics.sources}

    def agent_for(topic: faust.TopicT, parse: Parser):
        name = settings.source_of(topic.get_topic_name())

        async def ingest(stream: faust.StreamT) -> None:
            async for event in stream.events():
                message = event.message
                origin = Origin(
                    topic=message.topic,
                    partition=message.partition,
                    offset=message.offset,
                    timestamp=message.timestamp,
                )
                try:
                    outcomes = readings(parse, event.value, origin, catalogue, settings)
                except Exception as error:  # a bug must not stop the stream or lose the record
                    log.error("%s:%d:%d: %s", message.topic, message.partition,
                              message.offset, type(error).__name__)  # fmt: skip
                    log.debug("ingest failed", exc_info=True)  # may name a patient
                    outcomes = [Rejected("processing_error", type(error).__name__)]
                for outcome in outcomes:
                    await publish(outcome, event, origin, name)

        return ingest

    async def publish(outcome: Outcome, event: faust.EventT, origin: Origin, name: str) -> None:
        if isinstance(outcome, Reading):
            await source_topics[outcome.topic].send(key=outcome.key, value=outcome.value)
            telemetry.accepted(name)
            return
        log.debug("rejected %s:%s: %s", origin.topic, origin.offset, outcome)
        letter = dead_letter(outcome.reason, outcome.detail, origin.topic, origin.partition,
                             origin.offset, event.key, event.value)  # fmt: skip
        await topics.deadletter.send(key=event.key, value=json_bytes(letter))
        telemetry.rejected(name, outcome.reason)

    for topic, parse in ((topics.fhir_observations, fhir.parse),
                         (topics.omh_datapoints, open_mhealth.parse)):  # fmt: skip
        name = settings.source_of(topic.get_topic_name())
        app.agent(topic, name=f"interop-{name}")(agent_for(topic, parse))
