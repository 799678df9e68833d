"""The Faust application, built from Settings (no module-level global state)."""

from __future__ import annotations

import faust

from streams.agents import ingest
from streams.settings import Settings
from streams.topics import Topics, declare_topics


def create_app(settings: Settings | None = None) -> tuple[faust.App, Topics]:
    """A configured Faust app with its topics declared and agents registered."""
    settings = settings or Settings()
    app = faust.App(
        settings.app_id,
        broker=settings.broker_url,
        broker_credentials=settings.broker_credentials(),
        store=settings.store_url,
        datadir=str(settings.data_dir),
        topic_partitions=settings.partitions,
        topic_replication_factor=settings.replication_factor,
        web_enabled=settings.web_enabled,
        web_port=settings.web_port,
        web_bind="127.0.0.1",
        producer_acks=-1,
        key_serializer="raw",
        value_serializer="raw",
    )
    topics = declare_topics(app, settings)
    ingest.register(app, topics)
    return app, topics
