"""What the end-to-end tests of one worker on the real broker set up alike: a
catalogue file, a fresh topic prefix and app id, and the worker's environment
and settings to match."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import NamedTuple

from streams.catalogue import Catalogue
from streams.settings import Settings

#: Readings of a simulated programme may be years old: the event-time window
#: must not reject them.
MAX_AGE_DAYS = 36500


class CatalogueRun(NamedTuple):
    catalogue: Catalogue
    catalogue_file: Path
    prefix: str
    env: dict[str, str]  # the worker process's environment (EFFICACY_*)
    settings: Settings  # the same settings, for this process


def catalogue_run(
    kafka_bootstrap: str, directory: Path, catalogue_text: str, name: str, partitions: int = 2
) -> CatalogueRun:
    """A run under ``directory`` with the catalogue ``catalogue_text``, its
    topics prefixed ``{name}-{random}.``."""
    catalogue_file = directory / "measures.toml"
    catalogue_file.write_text(catalogue_text)
    run_id = uuid.uuid4().hex[:8]
    prefix, app_id = f"{name}-{run_id}.", f"{name}-{run_id}"
    env = {
        "EFFICACY_BOOTSTRAP_SERVERS": kafka_bootstrap,
        "EFFICACY_TOPIC_PREFIX": prefix,
        "EFFICACY_APP_ID": app_id,
        "EFFICACY_PARTITIONS": str(partitions),
        "EFFICACY_WEB_ENABLED": "false",
        "EFFICACY_METRICS_PORT": "0",
        "EFFICACY_DATA_DIR": str(directory / "data"),
        "EFFICACY_MEASURES_FILE": str(catalogue_file),
        "EFFICACY_MAX_AGE_DAYS": str(MAX_AGE_DAYS),
    }
    settings = Settings(
        bootstrap_servers=kafka_bootstrap, topic_prefix=prefix, partitions=partitions,
        app_id=app_id, measures_file=catalogue_file, max_age_days=float(MAX_AGE_DAYS),
    )  # fmt: skip
    return CatalogueRun(Catalogue.load(catalogue_file), catalogue_file, prefix, env, settings)
