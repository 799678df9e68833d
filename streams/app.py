"""The Faust application, built from Settings (no module-level global state).

patients     raw topics -> validation (deadletter), patients table, scores, alerts,
             population-evidence
population   population-evidence -> population table; timer -> population-posterior
             (each measure's posterior, and each joint group's, key joint:<group>)
posteriors   population-posterior (all partitions, every worker) -> rescoring
web          GET /patients/{id}/score, answered by the patient's owner (score_lookup)
interop      fhir-observations, omh-datapoints -> readings on the source topics (deadletter)
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import faust

from model.config import ModelConfig
from streams import consumer_seek, group_offsets, loop_lag, score_lookup
from streams.agents import drift, interop, patients, population
from streams.agents.population import in_thread
from streams.catalogue import Catalogue, CatalogueError
from streams.chunked_consumer import ChunkedApp
from streams.group_offsets import GroupOffsets
from streams.joint_stream import compile_joint_scoring
from streams.kafka_options import faust_credentials
from streams.posterior_feed import PosteriorBook, follow_posteriors
from streams.rescore_queue import RescoreQueue
from streams.schemas import JointPosterior, PopulationPosterior
from streams.scoring import compile_scoring
from streams.settings import Settings
from streams.stores import PartitionedByKey
from streams.telemetry import Telemetry
from streams.topics import MAX_MESSAGE_BYTES, Topics, declare_topics

log = logging.getLogger(__name__)

# aiokafka sends one produce request per broker at a time, holding at most one
# batch per partition, and a send to a partition whose batch is full waits for
# that request: with faust's 16 KB batches (three patients' changelog records)
# a step's writes became a chain of small requests, one broker round trip each.
PRODUCER_BATCH_BYTES = 1024 * 1024


@dataclass
class Pipeline:
    """The app and the services behind its agents (for tests and the CLI)."""

    app: faust.App
    topics: Topics
    settings: Settings
    catalogue: Catalogue
    telemetry: Telemetry
    patients: patients.PatientsService
    population: population.PopulationService
    posteriors: PosteriorBook
    lookup: score_lookup.ScoreLookup


def measure_models(catalogue: Catalogue, settings: Settings) -> dict[str, ModelConfig]:
    """The streaming ModelConfig of every catalogue measure. A Bernoulli or
    Poisson measure with further grouping levels is not streamed (its cohort
    posteriors are published for the cohort level only): CatalogueError."""
    for spec in catalogue.measures.values():
        if spec.family != "gaussian" and spec.grouping_levels:
            raise CatalogueError(
                f"{spec.name}: a {spec.family} measure is streamed with the cohort level only, "
                f"not grouping_levels {list(spec.grouping_levels)}; fit it with efficacy fit "
                f"--family {spec.family}"
            )
    origin_days = settings.time_origin.timestamp() / 86400.0
    return {
        name: spec.model_config_for(
            time_origin_days=origin_days,
            time_scale_days=settings.time_scale_days,
            half_life_days=settings.half_life_days,
            recent_half_life_days=settings.recent_half_life_days,
            covariates=catalogue.covariates,
        )
        for name, spec in catalogue.measures.items()
    }


def create_pipeline(settings: Settings | None = None, metrics=None) -> Pipeline:
    """A configured Faust app with its topics, tables and agents registered."""
    settings = settings or Settings()
    consumer_seek.install()  # no records skipped after a rebalance (see the module)
    catalogue = Catalogue.load(settings.measures_file)
    app = ChunkedApp(
        settings.app_id,
        broker=settings.broker_url,
        broker_credentials=faust_credentials(settings),
        store=settings.store_url,
        datadir=str(settings.faust_dir),
        topic_partitions=settings.partitions,
        topic_replication_factor=settings.replication_factor,
        table_standby_replicas=settings.standby_replicas,
        web_enabled=settings.web_enabled,
        web_port=settings.web_port,
        web_bind=settings.web_bind,
        web_host=settings.advertised_web_host,
        canonical_url=score_lookup.canonical_url(settings),
        web_ssl_context=score_lookup.server_ssl_context(settings),
        # faust's own pages are off: /table/ would serve the patients table to
        # anyone, unauthenticated and unaudited (streams.score_lookup is the way in).
        web_router_enabled=False,
        web_tables_enabled=False,
        web_stats_enabled=False,
        web_graph_enabled=False,
        producer_acks=-1,
        producer_linger_ms=settings.producer_linger_ms,
        producer_request_timeout=settings.producer_request_timeout_seconds,
        producer_max_request_size=MAX_MESSAGE_BYTES,
        producer_max_batch_size=PRODUCER_BATCH_BYTES,
        consumer_max_fetch_size=MAX_MESSAGE_BYTES,
        key_serializer="raw",
        value_serializer="raw",
    )
    topics = declare_topics(app, settings)
    telemetry = Telemetry(metrics)
    loop_lag.install(app, telemetry)
    models = measure_models(catalogue, settings)
    posteriors = PosteriorBook()
    population_service = population.PopulationService(
        app, topics, models, posteriors, settings, telemetry, drift=settings.drift,
        catalogue=catalogue,
    )  # fmt: skip
    patients_service = patients.PatientsService(
        app, topics, catalogue, models, posteriors, settings, telemetry,
        paused=lambda: population_service.taking_over,
    )  # fmt: skip
    population_service.backlogged = patients_service.backlogged
    raw_names = [topic.get_topic_name() for topic in topics.raw]
    if settings.group_backlog_horizon_seconds > 0:
        offsets = GroupOffsets(settings, settings.app_id, raw_names)
        group_offsets.watch(
            app, offsets, population_service.group, telemetry,
            interval=settings.population_interval_seconds,
        )  # fmt: skip
    # The patients agent takes the raw topics by fetched partition chunk, and the
    # tables' recovery and standby copies their changelogs (streams.chunked_consumer).
    changelogs = [
        table.changelog_topic.get_topic_name()
        for table in app.tables.values()
        if isinstance(table, PartitionedByKey)
    ]
    app.chunked_topics = frozenset(raw_names + changelogs)
    patients.register(app, patients_service)
    population.register(app, population_service)
    drift.register(app, topics, telemetry)
    interop.register(app, topics, catalogue, settings, telemetry)
    lookup = score_lookup.register(app, patients_service, settings, topics.audit.get_topic_name())

    compiled: set = set()  # (structure, number of draws) whose scoring shapes are compiled

    async def compile_ahead(measure: str) -> None:
        """Compile the scoring shapes of a measure's first posterior off the event
        loop, unless a measure of the same structure already did."""
        model, posterior = models.get(measure), posteriors[measure]
        shapes = (model.structure if model else None, int(posterior.draws.mu.shape[0]))
        if model is None or shapes in compiled:
            return
        compiled.add(shapes)
        started = time.perf_counter()
        try:
            spec = catalogue.get(measure)
            runs = await in_thread(compile_scoring, posterior, spec, model, settings.batch_size)
        except Exception:  # the agent compiles what it needs on first use instead
            log.exception("could not compile scoring for %s ahead of use", measure)
            return
        seconds = time.perf_counter() - started
        log.info("compiled scoring for %s: %d shapes in %.1f s", measure, runs, seconds)

    async def compile_joint_ahead(message: JointPosterior) -> None:
        """As compile_ahead, for a joint group's scoring."""
        config = patients_service.context.joint.get(message.group)
        shapes = (config, len(message.draws["mu"]))
        if config is None or shapes in compiled:
            return
        compiled.add(shapes)
        try:
            specs = [catalogue.get(m) for m in message.measures]
            await in_thread(compile_joint_scoring, message, config, specs)
        except Exception:  # scoring compiles what it needs on first use instead
            log.exception("could not compile the joint scoring of %s ahead of use", message.group)

    rescoring = RescoreQueue(settings.rescore_max_delay_seconds)

    async def on_new_posterior(message: PopulationPosterior | JointPosterior) -> None:
        """Compile its scoring, then queue the rescoring of this worker's
        patients (streams.rescore_queue: versions that arrive before the pass
        starts merge into it)."""
        now = time.monotonic()
        if isinstance(message, JointPosterior):
            await compile_joint_ahead(message)
            rescoring.request(message.group, joint=True, force=False, now=now)
        else:
            await compile_ahead(message.measure)
            rescoring.request(message.measure, joint=False, force=message.rescore, now=now)

    async def guarded(task) -> None:
        try:
            await task
        except asyncio.CancelledError:
            raise
        except Exception:
            if app.should_stop:
                # The worker is stopping and its producer closed under a rescoring:
                # not a crash. The patients it did not reach are rescored on the next
                # start (their scores are under an older version).
                log.info("%s stopped with the worker", task.__qualname__)
                return
            log.exception("%s stopped", task.__qualname__)
            raise

    @app.task
    async def posteriors_feed() -> None:
        await guarded(follow_posteriors(settings, posteriors, on_new_posterior))

    @app.task
    async def rescore_patients() -> None:
        await guarded(patients_service.rescore_queued(rescoring))

    @app.task
    async def count_patients() -> None:
        await guarded(patients_service.keep_held_counted())

    return Pipeline(
        app,
        topics,
        settings,
        catalogue,
        telemetry,
        patients_service,
        population_service,
        posteriors,
        lookup,
    )


def create_app(settings: Settings | None = None) -> tuple[faust.App, Topics]:
    pipeline = create_pipeline(settings)
    return pipeline.app, pipeline.topics
