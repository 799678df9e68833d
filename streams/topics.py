"""Topic names (prefix from settings) and their declaration on a Faust app."""

from __future__ import annotations

import asyncio
from typing import NamedTuple

import faust

from streams.settings import Settings

SOURCE_TOPICS = ("wearables", "labs", "pros")


class Topics(NamedTuple):
    """Every topic of the pipeline (streams.schemas documents keys and values)."""

    enrollments: faust.TopicT
    wearables: faust.TopicT
    labs: faust.TopicT
    pros: faust.TopicT
    deadletter: faust.TopicT
    population_evidence: faust.TopicT
    population_posterior: faust.TopicT
    scores: faust.TopicT
    alerts: faust.TopicT
    structure_selection: faust.TopicT
    fhir_observations: faust.TopicT
    omh_datapoints: faust.TopicT
    audit: faust.TopicT
    subgroup_scores: faust.TopicT

    @property
    def sources(self) -> tuple[faust.TopicT, ...]:
        return (self.wearables, self.labs, self.pros)

    @property
    def raw(self) -> tuple[faust.TopicT, ...]:
        """What producers write and the patients agent reads: enrolments and readings."""
        return (self.enrollments, *self.sources)

    @property
    def interop(self) -> tuple[faust.TopicT, ...]:
        """FHIR Observations and Open mHealth data points (streams.agents.interop)."""
        return (self.fhir_observations, self.omh_datapoints)


def declare_topics(app: faust.App, settings: Settings) -> Topics:
    """Raw bytes in and out: agents parse and validate themselves, so a malformed
    record reaches our code (and the dead-letter topic) instead of crashing the stream.
    Every topic has ``settings.partitions`` partitions: the patients agent relies on
    the raw topics and its table's changelog being co-partitioned by patient id."""

    def topic(field: str) -> faust.TopicT:
        name = topic_name(field)
        return app.topic(
            settings.topic(name),
            key_serializer="raw",
            value_serializer="raw",
            partitions=settings.partitions,
            config=TOPIC_CONFIG.get(name),
            # internal: faust declares the topics it reads with these partitions
            # and settings; ensure_topics creates all of them before a worker starts.
            internal=True,
        )

    return Topics(*(topic(field) for field in Topics._fields))


START_ATTEMPTS = 15  # tries to reach the broker, 2 s apart
AUTHORIZATION_ATTEMPTS = 10  # tries to create a topic the broker refuses, 1 s apart


async def ensure_topics(settings: Settings) -> list[str]:
    """Create every pipeline topic that does not exist yet, with the pipeline's
    partitions, replication and TOPIC_CONFIG; returns the names created.

    The worker calls this before it starts. Faust itself creates only the topics
    its agents and tables read, and only once it runs: a producer (or an agent
    writing scores, alerts or dead letters) that comes first would make the
    broker auto-create the topic with its defaults (one partition, no
    compaction), and a raw topic with fewer partitions than the others breaks
    the co-partitioning by patient."""
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic
    from aiokafka.errors import (
        KafkaConnectionError,
        TopicAlreadyExistsError,
        TopicAuthorizationFailedError,
        for_code,
    )

    from streams.kafka_options import aiokafka_options, start_client

    admin = AIOKafkaAdminClient(**aiokafka_options(settings))
    try:
        for attempt in range(START_ATTEMPTS):  # the broker may still be starting
            try:  # a broker that refuses the credentials raises KafkaAccessError at once
                await start_client(admin, settings)
                break
            except KafkaConnectionError:
                if attempt == START_ATTEMPTS - 1:
                    raise
                await asyncio.sleep(2.0)
        existing = set(await admin.list_topics())
        wanted = [
            NewTopic(
                name=settings.topic(topic_name(field)),
                num_partitions=settings.partitions,
                replication_factor=settings.replication_factor,
                topic_configs=TOPIC_CONFIG.get(topic_name(field), {}),
            )
            for field in Topics._fields
        ]
        created = []
        for topic in wanted:
            if topic.name in existing:
                continue
            for attempt in range(AUTHORIZATION_ATTEMPTS):
                # create_topics reports failures per topic in its response, not by raising.
                response = await admin.create_topics([topic])
                (name, code, *detail), *_ = response.topic_errors
                error = for_code(code)
                if code == 0:
                    created.append(name)
                elif error is TopicAuthorizationFailedError and (
                    attempt < AUTHORIZATION_ATTEMPTS - 1
                ):
                    # ACLs granted a moment ago may not have reached the authorizer
                    # that decides (in KRaft, the controller's) yet.
                    await asyncio.sleep(1.0)
                    continue
                elif error is not TopicAlreadyExistsError:  # another worker made it meanwhile
                    raise RuntimeError(f"cannot create topic {name}: {error.__name__} {detail}")
                break
        return created
    finally:
        await admin.close()


def topic_name(field: str) -> str:
    """Topic names use hyphens: population_posterior -> population-posterior."""
    return field.replace("_", "-")


#: The largest message the app sends or fetches (its producer's max_request_size,
#: its consumer's max_fetch_size) and the broker limit of the topics that carry
#: large messages (their max.message.bytes): 16 MiB.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024

#: Broker-side settings of topics the app creates. The posterior topic keeps the
#: latest posterior per measure forever (compacted); its messages carry the draws.
#: The structure-selection topic keeps the latest selection per measure. Evidence
#: messages carry many patients' statistics each.
TOPIC_CONFIG: dict[str, dict[str, str]] = {
    "population-posterior": {
        "cleanup.policy": "compact",
        "max.message.bytes": str(MAX_MESSAGE_BYTES),
    },
    "structure-selection": {"cleanup.policy": "compact"},
    # The latest score per patient is the current state: a new consumer reads it
    # without replaying every score ever published.
    "scores": {"cleanup.policy": "compact"},
    "subgroup-scores": {"cleanup.policy": "compact"},
    # One message carries the statistics of up to EVIDENCE_CHUNK patients.
    "population-evidence": {"max.message.bytes": str(MAX_MESSAGE_BYTES)},
    # Who read whose score: kept until an operator decides otherwise (a broker's
    # default retention would delete the audit trail after a week).
    "audit": {"retention.ms": "-1"},
}
