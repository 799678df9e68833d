"""Topic names (prefix from settings) and their declaration on a Faust app."""

from __future__ import annotations

from typing import NamedTuple

import faust

from streams.settings import Settings

SOURCE_TOPICS = ("wearables", "labs", "pros")


class Topics(NamedTuple):
    wearables: faust.TopicT
    labs: faust.TopicT
    pros: faust.TopicT
    observations: faust.TopicT
    deadletter: faust.TopicT

    @property
    def sources(self) -> tuple[faust.TopicT, ...]:
        return (self.wearables, self.labs, self.pros)


def declare_topics(app: faust.App, settings: Settings) -> Topics:
    """Raw bytes in and out: agents parse and validate themselves, so a malformed
    record reaches our code (and the dead-letter topic) instead of crashing the stream."""

    def topic(name: str) -> faust.TopicT:
        return app.topic(
            settings.topic(name),
            key_serializer="raw",
            value_serializer="raw",
            partitions=settings.partitions,
        )

    return Topics(*(topic(name) for name in Topics._fields))
