"""What the end-to-end tests on the real broker set up alike: a catalogue file,
a fresh topic prefix and app id, and the worker's environment and settings to
match; two workers started in turn; when a joint group's run has settled."""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from aiokafka.structs import ConsumerRecord

from cli.worker_process import READY, WorkerProcess
from streams.catalogue import Catalogue
from streams.partitioning import posterior_key
from streams.schemas import JointPosterior
from streams.settings import Settings

#: Readings of a simulated programme may be years old: the event-time window
#: must not reject them.
MAX_AGE_DAYS = 36500
#: Faust's log line each time a worker's consumer group has been rebalanced.
SYNCED = r"Successfully synced group .* with generation \d+"


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


def start_in_turn(first: WorkerProcess, second: WorkerProcess) -> None:
    """Start ``first``, then ``second`` once ``first`` is READY, and return once
    both hold partitions: ``second`` READY and the group synced twice in
    ``first``'s log (its first generation, then the one with ``second``)."""
    first.start()
    first.wait_for_log(READY, timeout=180)
    second.start()
    second.wait_for_log(READY, timeout=180)
    first.wait_for_log(SYNCED, count=2)


class JointSettling:
    """When a run scoring the joint group ``group`` has settled, read from
    ``topics`` (``{prefix}population-posterior`` and ``{prefix}scores``, in that
    order, what to pass cli.kafka_io.read_until).

    ``final(found)``: the group's latest JointPosterior among the records
    ``found`` if it covers every reading (its num_observations, rounded, equal
    ``totals``, one a measure), else None. ``settled(found)``: there is such a
    posterior and the latest score of every one of ``patients`` carries a joint
    score of the group under that posterior's version."""

    def __init__(self, prefix: str, patients: Sequence[str], totals: list[int], group: str) -> None:
        self.topics = [prefix + "population-posterior", prefix + "scores"]
        self.patients = patients
        self.totals = totals
        self.group = group

    def final(self, found: Sequence[ConsumerRecord]) -> JointPosterior | None:
        joint = [
            JointPosterior.model_validate_json(r.value)
            for r in found
            if r.topic == self.topics[0] and r.key.decode() == posterior_key(self.group)
        ]
        latest = max(joint, key=lambda p: p.version, default=None)
        if latest is None or [round(n) for n in latest.num_observations] != self.totals:
            return None
        return latest

    def settled(self, found: Sequence[ConsumerRecord]) -> bool:
        posterior = self.final(found)
        if posterior is None:
            return False
        latest = {r.key.decode(): json.loads(r.value) for r in found if r.topic == self.topics[1]}
        return all(
            p in latest
            and any(
                j["group"] == self.group and j["population_version"] == posterior.version
                for j in latest[p]["joint"]
            )
            for p in self.patients
        )
