"""population: one active owner per measure (the measure's partition of the
population-evidence topic). Keeps every patient's latest statistics in a
changelogged table and in arrays (streams.population_book), and on a timer runs
the warm-started variational update off the event loop whenever there is new
evidence, publishing the versioned posterior to the compacted
population-posterior topic.

Periodically (``selection_interval_seconds``) it also runs a structure selection
of every owned measure whose evidence changed (streams.population_book.
StructureSelectionRun) and publishes it to the compacted structure-selection
topic. Advisory: the pipeline keeps scoring with the measure's configured
structure. Its SVI fits take the same lock as the population update, one fit at
a time, so an update waits for at most one fold's fit, never for a whole selection.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import itertools
import logging
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Self

import faust
import numpy as np
from faust.types import TP

from model.config import DecisionRule, ModelConfig, SVIConfig
from model.evidence import PatientStats
from model.exported import ExportCache
from model.selection import FitterCache
from monitoring.drift import (
    DriftConfig,
    GaussianSummary,
    PosteriorShiftDetector,
    WindowShiftDetector,
)
from streams.catalogue import Catalogue
from streams.consumer_seek import fetched_since_rebalance
from streams.fit_pace import FitPace
from streams.group_backlog import GroupBacklog
from streams.joint_stream import (
    POSTERIOR_VALUE_LIMIT,
    JointModel,
    benefit_signs,
    fit_to_size,
    joint_digest,
    joint_models,
    joint_snapshot,
    posterior_key,
)
from streams.output import DeliveryFailed, Producer, delivered, stop_now
from streams.partitioning import EvidencePartitions
from streams.population_book import (
    FitResult,
    FitterPool,
    GroupLabels,
    PopulationBook,
    PopulationModel,
    StructureSelectionRun,
)
from streams.posterior_feed import PosteriorBook
from streams.schemas import (
    EvidenceBatch,
    Interval,
    JointPosterior,
    PatientEvidence,
    PopulationPosterior,
    StructureSelection,
    SubgroupScore,
    json_bytes,
)
from streams.settings import Settings
from streams.stores import PartitionedByKey
from streams.subgroup_scores import BookSnapshot, subgroup_step
from streams.telemetry import Telemetry
from streams.topics import Topics

log = logging.getLogger(__name__)


REBUILD_CHUNK = 2000  # table values parsed between yields to the event loop (~40 ms)


class MeasurePartitionedTable(PartitionedByKey):
    """A table keyed ``measure/patient`` whose changelog partition (and RocksDB
    database) is the measure's partition of the population-evidence topic
    (``evidence``, streams.partitioning.EvidencePartitions), whatever event is
    being processed (streams.stores)."""

    evidence: EvidencePartitions

    @classmethod
    def of_evidence(cls, app: faust.App, name: str, evidence: EvidencePartitions) -> Self:
        """The table ``name`` on ``app``, partitioned as ``evidence``."""
        table = cls.register(app, name, evidence.partitions)
        table.evidence = evidence
        return table

    def partition_for_key(self, key: str) -> int:
        return self.evidence(key.partition("/")[0])


class PopulationService:
    def __init__(
        self,
        app: faust.App,
        topics: Topics,
        models: dict[str, ModelConfig],
        posteriors: PosteriorBook,
        settings: Settings,
        telemetry: Telemetry,
        svi: SVIConfig | None = None,
        drift: DriftConfig | None = None,
        catalogue: Catalogue | None = None,
        backlogged: Callable[[], bool] = lambda: False,
    ) -> None:
        self.app = app
        # Whether the patients agent has a backlog (PatientsService.backlogged),
        # or another worker of the group (``group``, polled by
        # streams.group_offsets.watch): fits are then paced (streams.fit_pace).
        self.backlogged = backlogged
        # (a horizon of 0 turns the poll off: nothing is observed, never behind)
        self.group = GroupBacklog(max(settings.group_backlog_horizon_seconds, 1.0))
        self.pace = FitPace(settings.population_backlog_share)
        self.catalogue = catalogue  # its subgroups are scored after every posterior
        self.subgroups: dict[str, dict[str, SubgroupScore]] = {}  # last published
        self.topics = topics
        self.models = models
        self.posteriors = posteriors
        self.settings = settings
        self.telemetry = telemetry
        self.svi = svi
        # Shared by all measures: one compile per shape; the traced programs kept
        # next to JAX's compilation cache (model.exported), so a restart does not
        # trace them again.
        self.fitters = FitterPool(svi, ExportCache.beside(settings.compilation_cache_dir))
        self.books: dict[str, PopulationBook] = {}
        self.fits: dict[str, PopulationModel] = {}
        self.recent_fits: dict[str, PopulationModel] = {}  # recent-window fits
        # A new owner's cold recent-window fits, run after its first posteriors (fit).
        self._recent_warmups: dict[str, tuple] = {}
        self.drift = drift or DriftConfig()
        self.detectors: dict[str, DriftDetectors] = {}
        # Held by every SVI fit (population updates and each selection fold): one
        # fit at a time. asyncio.Lock is FIFO, so a waiting update goes before the
        # selection's next fold.
        self._fitting = asyncio.Lock()
        self._ticking = False
        self._owned: set[str] = set()  # measures owned at the last tick
        self._taking_over = False
        self._rebuilding: dict[str, list[EvidenceBatch]] = {}  # batches taken meanwhile
        self.selection_fitters: FitterCache = {}  # compiled, shared by all measures
        self._last_selection: dict[str, tuple[float, str]] = {}  # (monotonic start, digest)
        self._selecting = False
        # Joint groups (streams.joint_stream): fitted by a worker that owns every
        # measure of the group, after the measures' own fits of a tick.
        self.joint = joint_models(catalogue, models) if catalogue is not None else {}
        self.joint_fits: dict[str, JointModel] = {}
        self._joint_fitted: dict[str, str] = {}  # evidence digest of the last fit, by group
        # Each measure's evidence partition: a joint group's measures share one,
        # so the worker that owns it has every book of the group.
        self.evidence_partitions = EvidencePartitions(
            settings.partitions, catalogue.joint if catalogue is not None else ()
        )
        self.table = MeasurePartitionedTable.of_evidence(
            app, "population-evidence", self.evidence_partitions
        )
        self.producer = Producer(app)

    def detector(self, measure: str) -> DriftDetectors:
        if measure not in self.detectors:
            self.detectors[measure] = DriftDetectors.from_config(self.drift)
        return self.detectors[measure]

    def book(self, measure: str) -> PopulationBook:
        if measure not in self.books:
            self.books[measure] = PopulationBook(measure, self.models[measure])
        return self.books[measure]

    def take(self, batch: EvidenceBatch) -> None:
        """Each patient's latest statistics into the measure's book (after the
        book's rebuild, while one runs)."""
        pending = self._rebuilding.get(batch.measure)
        if pending is not None:
            pending.append(batch)
            return
        self.book(batch.measure).put_many(batch.items)

    async def keep(self, batch: EvidenceBatch) -> None:
        """Each patient's latest statistics into the table (keyed
        ``measure/patient``: the changelog compacts to one entry per patient),
        from which a new owner rebuilds the book; delivered before the batch is
        acknowledged (streams.stores.PartitionedByKey.write_many)."""
        items = {
            f"{evidence.measure}/{evidence.patient_id}": json_bytes(evidence)
            for evidence in batch.items
        }
        try:
            await delivered(await self.table.write_many(items, self.producer))
        except DeliveryFailed as error:
            stop_now(error)

    def paced(self) -> bool:
        """Whether fits are paced now: this worker or another of its group has
        a backlog of raw records."""
        return self.backlogged() or self.group.backlogged(time.monotonic())

    def owns(self, measure: str) -> bool:
        """This worker actively owns the measure's evidence partition."""
        tp = TP(self.topics.population_evidence.get_topic_name(), self.evidence_partitions(measure))
        return tp in self.app.assignor.assigned_actives()

    async def rebuild_book(self, measure: str) -> None:
        """Refill the measure's book from the table, which recovery made complete.
        Needed whenever this worker becomes the measure's owner (start, restart,
        rebalance): its book is empty, or stale (built while it was not the
        owner), and the fit state and version of an earlier ownership are stale.

        Without blocking the event loop (at 1M patients the parse takes tens of
        seconds): the measure's values are read from its partition
        (``prefix_values``) and parsed REBUILD_CHUNK at a time, yielding between
        chunks. Evidence batches that arrive meanwhile
        are applied after, in order: the agent writes the table before it takes
        a batch, so a patient's last pending batch is never older than the table
        value read for it."""
        self.fits.pop(measure, None)
        self.recent_fits.pop(measure, None)
        self.detectors.pop(measure, None)  # references of an earlier ownership
        group = self.catalogue.joint_group_of(measure) if self.catalogue is not None else None
        if group is not None:  # its joint group's fit continues what is published
            self.joint_fits.pop(group.name, None)
            self._joint_fitted.pop(group.name, None)
        book = PopulationBook(measure, self.models[measure])
        self._rebuilding[measure] = pending = []
        started = time.monotonic()
        try:
            values = self.table.prefix_values(self.evidence_partitions(measure), f"{measure}/")
            while chunk := list(itertools.islice(values, REBUILD_CHUNK)):
                book.put_many([PatientEvidence.model_validate_json(raw) for raw in chunk])
                await asyncio.sleep(0)
            for batch in pending:
                book.put_many(batch.items)
        finally:
            del self._rebuilding[measure]
        self.books[measure] = book
        log.info(
            "population book of %s rebuilt: %d patients in %.1f s",
            measure,
            book.num_patients,
            time.monotonic() - started,
        )

    @property
    def taking_over(self) -> bool:
        """This worker is rebuilding and fitting measures it newly owns that have
        a published posterior (a restart, a rebalance; warm fits of seconds).
        Rescoring after a posterior waits meanwhile (PatientsService.paused):
        the posteriors these fits bring supersede the ones it would rescore for,
        and rescoring on the event loop starves the fit's thread of the GIL (a
        restart at 20k patients: a 7-second fit took a minute). Cold first fits
        (minutes at scale) do not hold rescoring up."""
        return self._taking_over

    def ready(self) -> bool:
        """The table is recovered and the posterior feed has read what is
        published (the version to continue, the evidence already fitted)."""
        return self.posteriors.caught_up and not self.app.tables.recovery.in_recovery

    async def tick(self) -> None:
        """Fit every owned measure with new evidence (one fit at a time). Waits
        for the table's recovery and for the posterior feed to have read what is
        published (the version to continue and the evidence already fitted)."""
        if self._ticking or not self.ready():
            return
        self._ticking = True
        try:
            async with self._fitting:  # waits for at most one selection fold
                await self._tick()
        finally:
            self._ticking = False

    async def _tick(self) -> None:
        """Each owned measure in turn: its book rebuilt if it is newly owned, then
        fitted if it has new evidence. One measure's rebuild and fit before the
        next's rebuild, so the first posterior after a start waits for one
        book, not all of them. Newly owned measures with a published posterior
        go first: their fits are warm (seconds), and rescoring waits for them
        (``taking_over``)."""
        owned = {measure for measure in self.models if self.owns(measure)}
        for measure in self._owned - owned:  # moved away by a rebalance
            self.pace.forget(measure)
        self._owned &= owned
        warm = [
            m for m in self.models if m in owned - self._owned and m in self.posteriors.messages
        ]
        order = warm + [m for m in self.models if m in owned and m not in warm]
        self._taking_over = bool(warm)
        try:
            for measure in order:
                await self._tick_measure(measure)
                if measure in warm:
                    warm.remove(measure)
                    self._taking_over = bool(warm)
        finally:
            self._taking_over = False
        await self.warm_up_recent_fits()
        for group in self.joint:
            key, started = posterior_key(group), time.monotonic()
            if not self.pace.due(key, started, self.paced()):
                continue
            try:
                if await self.fit_joint(group) is not None:
                    self.pace.done(key, started, time.monotonic())
            except Exception:  # keep the agent alive; the next tick retries
                log.exception("joint update of %s failed", group)
                self._joint_fitted.pop(group, None)

    async def warm_up_recent_fits(self) -> None:
        """One of the recent-window fits the tick's posteriors went out without
        (a new owner's, ``fit``), fitted now, so the next update of its measure
        compares windows again at the cost of a warm fit. One a tick: each is
        cold (a minute at 100k patients, a quarter of an hour at 1M), and the
        next tick's all-time updates of new evidence go before the next one
        (all of them in one tick held a 1M worker's next posteriors for over
        14 minutes, benchmarks/README.md section 7)."""
        app = self.app

        def unless_stopping(*_: object) -> None:
            # A stopping worker waits for its fit thread, and this fit's result
            # is never published.
            if app.should_stop:
                raise FitAbandoned("the worker is stopping")

        while self._recent_warmups:
            measure, (model, *evidence) = self._recent_warmups.popitem()
            if model is not self.recent_fits.get(measure) or not self.owns(measure):
                continue  # the measure moved, or its book was rebuilt, meanwhile
            started = time.monotonic()
            try:
                await in_thread(functools.partial(model.fit, progress=unless_stopping), *evidence)
            except FitAbandoned:
                return
            except Exception:  # drift monitoring must not stop the agent
                log.exception("the recent-window fit of %s failed", measure)
                continue
            log.info("recent-window fit of %s warmed up in %.1f s", measure,
                     time.monotonic() - started)  # fmt: skip
            return

    def joint_books(self, group: str) -> list[PopulationBook | None] | None:
        """The books of a joint group's measures (None for a measure without
        evidence yet), or None unless this worker owns every measure of it (the
        measures' books live with their owners; the measures share the group's
        evidence partition, streams.partitioning.EvidencePartitions, so one
        worker owns them all, and none while a rebalance moves it)."""
        measures = self.catalogue.joint_group_of_name(group).measures
        if not all(m in self._owned and self.owns(m) for m in measures):
            return None
        return [self.books.get(m) for m in measures]

    async def fit_joint(self, group: str) -> JointPosterior | None:
        """Fit a joint group whose evidence changed since its last fit (warm,
        off the event loop) and publish its posterior on the posterior topic
        (key ``joint:<group>``). None when nothing was published."""
        books = self.joint_books(group)
        if books is None or all(book is None for book in books):
            return None
        config = self.joint[group]
        snapshot = joint_snapshot(books, config)
        if len(snapshot.patient_ids) < max(self.settings.population_min_patients, 2):
            return None
        digest = joint_digest(snapshot)
        published = self.posteriors.joint.get(group)
        if self._joint_fitted.get(group) == digest or (
            group not in self.joint_fits
            and published is not None
            and published.evidence_digest == digest
        ):
            return None
        model = self.joint_fits.get(group)
        if model is None:
            measures = self.catalogue.joint_group_of_name(group).measures
            signs = benefit_signs([self.catalogue.get(name) for name in measures])
            model = self.joint_fits[group] = JointModel(
                group, measures, config, self.fitters, signs=signs
            )
            if published is not None:
                model.continue_from(published)
        self._joint_fitted[group] = digest
        result = await in_thread(model.fit, snapshot)
        if self.joint_books(group) is None:
            log.info("joint update of %s dropped: no longer the owner of its measures", group)
            return None
        message = result.message.model_copy(update={"evidence_digest": digest})
        # Serialised off the event loop; over the topic's limit (a cohort level's
        # tables grow with the cohorts) it goes out with fewer draws, never not at all.
        sized = await in_thread(fit_to_size, message, POSTERIOR_VALUE_LIMIT)
        if sized.thinned:
            log.warning(
                "joint %s v%d: posterior of %d bytes exceeds the limit of %d bytes: published "
                "with %d of its %d draws, evenly thinned (%d bytes)",
                group, message.version, sized.original_bytes, POSTERIOR_VALUE_LIMIT,
                sized.draws, sized.original_draws, len(sized.value),
            )  # fmt: skip
            self.telemetry.joint_posterior_thinned(group)
        message = sized.message
        await self.topics.population_posterior.send(
            key=posterior_key(group).encode(), value=sized.value
        )
        log.info(
            "joint %s v%d: %d patients, %d steps in %.2f s",
            group, message.version, message.num_patients, message.svi_steps, result.seconds,
        )  # fmt: skip
        return message

    async def _tick_measure(self, measure: str) -> None:
        if measure not in self._owned:
            await self.rebuild_book(measure)
            self._owned.add(measure)
            # The first structure selection comes one interval after ownership starts.
            self._last_selection[measure] = (time.monotonic(), "")
        book = self.books.get(measure)
        if book is None or book.changes_since_fit == 0 or not self.owns(measure):
            return
        if book.num_patients < self.settings.population_min_patients:
            return
        started = time.monotonic()
        if not self.pace.due(measure, started, self.paced()):
            return
        try:
            await self.fit(measure, book)
        except Exception:  # keep the agent alive; the next tick retries
            log.exception("population update of %s failed", measure)
            book.changes_since_fit += 1
        self.pace.done(measure, started, time.monotonic())

    async def fit(self, measure: str, book: PopulationBook) -> None:
        model = self.fits.get(measure)
        if model is None:
            model = self.fits[measure] = PopulationModel(
                measure, self.models[measure], pool=self.fitters
            )
            # A new owner (a start, a restart, a rebalance) continues what it finds
            # published: the version sequence and, warm, the variational fit.
            published = self.posteriors.messages.get(measure)
            if published is not None:
                model.continue_from(published)
        stats, cohort, cohorts = book.snapshot()
        covariates = book.covariates_snapshot()
        groups = book.groups_snapshot()
        book.changes_since_fit = 0
        digest = evidence_digest(stats, cohort, cohorts, covariates, groups)
        published = self.posteriors.messages.get(measure)
        if published is not None and published.evidence_digest == digest:
            # The latest posterior was fitted on exactly this evidence (a restart,
            # a rebalance or a replay re-delivered it): refitting would only move
            # q(θ) by SVI noise and republish every score.
            return
        recent_model, recent_stats = None, book.recent_snapshot()
        if recent_stats is not None and recent_patients(recent_stats) >= max(
            self.settings.population_min_patients, 2
        ):
            recent_model = self.recent_fits.get(measure)
            if recent_model is None:
                recent_model = self.recent_fits[measure] = PopulationModel(
                    measure, self.models[measure], pool=self.fitters
                )
        if recent_model is not None and recent_model.state is None and published is not None:
            # A new owner continuing the published sequence: its all-time fit is
            # warm (seconds), the recent-window fit cold (a minute at 100k
            # patients). The posterior goes out first, without the window
            # comparison; the window fit starts after this tick's posteriors.
            self._recent_warmups[measure] = (
                recent_model, recent_stats, cohort, cohorts, covariates, groups,
            )  # fmt: skip
            recent_model = None
        result, recent = await in_thread(
            fit_with_window,
            model,
            recent_model,
            stats,
            recent_stats,
            cohort,
            cohorts,
            covariates,
            groups,
        )
        if not self.owns(measure):
            # A rebalance moved the measure during the fit (a first fit compiles
            # for tens of seconds): its new owner numbers the versions now, and
            # publishing this one would give two posteriors the same version.
            log.info("population update of %s dropped: no longer its owner", measure)
            return
        result.message = result.message.model_copy(update={"evidence_digest": digest})
        result.message = judge_drift(self.detector(measure), result.message, recent)
        await self.topics.population_posterior.send(
            key=measure.encode(), value=json_bytes(result.message)
        )
        self.telemetry.population_updated(result)
        await self.score_subgroups(
            result.message, BookSnapshot(stats.gram, cohort, cohorts, covariates, groups)
        )
        log.info(
            "population %s v%d: %d patients, effect %.3g, %d steps in %.2f s",
            measure,
            result.message.version,
            result.message.num_patients,
            result.message.summary["effect"].mean,
            result.message.svi_steps,
            result.seconds,
        )

    async def score_subgroups(self, posterior: PopulationPosterior, snapshot: BookSnapshot) -> None:
        """The catalogue's subgroups of the measure under the new posterior
        (streams.subgroup_scores): changed scores to subgroup-scores (key
        ``measure:subgroup``), changed calls to alerts. A failure is logged and
        leaves the posterior published."""
        measure = posterior.measure
        if self.catalogue is None or not self.catalogue.subgroups_of(measure):
            return
        if self.models[measure].family != "gaussian":  # subgroup means are Gaussian mixtures
            return
        try:
            state, outputs = await in_thread(
                subgroup_step,
                self.subgroups.get(measure, {}),
                posterior,
                snapshot,
                self.catalogue,
                self.models[measure],
                DecisionRule(),
            )
        except Exception:
            log.exception("the subgroup scores of %s failed", measure)
            return
        self.subgroups[measure] = state
        for score in outputs.scores:
            await self.topics.subgroup_scores.send(
                key=f"{measure}:{score.subgroup}".encode(),
                value=json_bytes(score),
            )
        for alert in outputs.alerts:
            await self.topics.alerts.send(key=measure.encode(), value=json_bytes(alert))

    def selection_due(self, measure: str) -> bool:
        """An owned measure (its book rebuilt by a tick) with enough patients and a
        published posterior, whose last selection started (or, before the first,
        whose ownership started) at least ``selection_interval_seconds`` ago."""
        book = self.books.get(measure)
        if measure not in self._owned or book is None:
            return False
        if self.models[measure].family != "gaussian":
            return False  # the candidates' held-out likelihoods are Gaussian ones
        if book.num_patients < self.settings.selection_min_patients:
            return False
        if self.posteriors.version(measure) < 1:
            return False
        last = self._last_selection.get(measure)
        if (
            last is not None
            and time.monotonic() - last[0] < self.settings.selection_interval_seconds
        ):
            return False
        return self.owns(measure)

    async def select_tick(self) -> None:
        """Structure selection of every owned measure that is due (one at a time)."""
        if self._selecting or not self.ready():
            return
        self._selecting = True
        try:
            for measure in sorted(self._owned):
                if not self.selection_due(measure):
                    continue
                try:
                    await self.select(measure)
                except Exception:  # keep the agent alive; retried after an interval
                    log.exception("structure selection of %s failed", measure)
                    self.telemetry.selection_failed(measure)
        finally:
            self._selecting = False

    async def select(self, measure: str) -> StructureSelection | None:
        """Compare the structures on the measure's current evidence and publish the
        result; None when the evidence is what the last selection compared, or the
        worker lost the measure meanwhile. Each fold's fit runs off the event loop
        under the fit lock. The first selection after a start also compiles every
        structure's fit (tens of seconds per structure on 2 cores), and a population
        update waits for that compile; later folds take about a second each for a
        few hundred patients."""
        started = time.monotonic()
        book = self.book(measure)
        snapshot = book.snapshot()
        covariates = book.covariates_snapshot()
        groups = book.groups_snapshot()
        digest = evidence_digest(*snapshot, covariates, groups)
        last = self._last_selection.get(measure)
        self._last_selection[measure] = (started, digest)  # a failure waits an interval too
        if last is not None and last[1] == digest:
            return None
        run = StructureSelectionRun(
            measure,
            self.models[measure],
            snapshot,
            num_folds=self.settings.selection_folds,
            fitters=self.selection_fitters,
            posterior_version=self.posteriors.version(measure),
            evidence_digest=digest,
            covariates=covariates,
            groups=groups,
        )
        while True:
            async with self._fitting:
                if not self.owns(measure):
                    log.info("structure selection of %s abandoned: no longer its owner", measure)
                    return None
                if not await in_thread(run.step):
                    break
        message = run.message()
        await self.topics.structure_selection.send(key=measure.encode(), value=json_bytes(message))
        self.telemetry.selection_published(message)
        return message


class FitAbandoned(Exception):
    """Raised from a fit's progress callback to end a fit nobody will use."""


async def in_thread(function, *args):
    """Run a blocking call off the event loop in its own thread (one fit at a
    time, so no pool is needed)."""
    loop = asyncio.get_running_loop()
    future = loop.create_future()

    def target() -> None:
        try:
            result = function(*args)
        except BaseException as error:  # handed to the awaiting coroutine
            loop.call_soon_threadsafe(_settle, future, None, error)
        else:
            loop.call_soon_threadsafe(_settle, future, result, None)

    # Not a daemon: a daemon thread still inside XLA when the interpreter tears
    # down aborts the process; a worker told to stop finishes the fit first.
    threading.Thread(target=target, name="population-fit", daemon=False).start()
    return await future


def _settle(future: asyncio.Future, result, error: BaseException | None) -> None:
    if future.cancelled():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def evidence_digest(
    stats,
    cohort: np.ndarray,
    cohorts: list[str],
    covariates: np.ndarray | None = None,
    groups: GroupLabels | None = None,
) -> str:
    """SHA-256 of the multiset of (statistics, reference time, cohort, covariates,
    groups) rows of a book snapshot: independent of the order patients were put in."""
    n = stats.gram.shape[0]  # (n, d, d) Gram matrices or (n, CELLS) cells

    def crc(names: list[str]) -> np.ndarray:
        return np.array([zlib.crc32(name.encode()) for name in names] or [0], dtype=float)

    columns = [stats.gram.reshape(n, -1), stats.reference_time, crc(cohorts)[cohort]]
    if covariates is not None:
        columns.append(np.asarray(covariates, dtype=float).reshape(n, -1))
    if groups is not None:
        columns += [crc(names)[groups.index[:, k]] for k, names in enumerate(groups.labels)]
    rows = np.ascontiguousarray(np.column_stack(columns), dtype=float)
    keys = rows.view(np.dtype((np.void, rows.dtype.itemsize * rows.shape[1]))).ravel()
    return hashlib.sha256(np.sort(keys).tobytes()).hexdigest()


#: A patient counts towards the recent window with this much weighted evidence
#: in it (readings at full weight); fewer such patients than the population
#: agent's minimum and the recent-window fit is skipped.
RECENT_MIN_WEIGHT = 0.5


def recent_patients(stats: PatientStats) -> int:
    """Patients with at least RECENT_MIN_WEIGHT of evidence in the recent window."""
    return int(np.sum(stats.weighted_count >= RECENT_MIN_WEIGHT))


def fit_with_window(
    model: PopulationModel,
    recent_model: PopulationModel | None,
    stats: PatientStats,
    recent_stats: PatientStats | None,
    cohort: np.ndarray,
    cohorts: list[str],
    covariates: np.ndarray | None = None,
    groups: GroupLabels | None = None,
) -> tuple[FitResult, Interval | None]:
    """The all-time update and, when there is a recent-window model, the
    recent-window update on the fast-forgetting statistics of the same patients
    (one thread). Returns the all-time result and the recent fit's population
    effect (raw units)."""
    result = model.fit(stats, cohort, cohorts, covariates, groups)
    if recent_model is None or recent_stats is None:
        return result, None
    try:
        recent = recent_model.fit(recent_stats, cohort, cohorts, covariates, groups)
    except Exception:  # drift monitoring must not hold back the posterior
        log.exception("the recent-window fit of %s failed", model.measure)
        return result, None
    return result, recent.message.summary.get("effect")


@dataclass
class DriftDetectors:
    """The population agent's detectors of one measure (monitoring.drift)."""

    shift: PosteriorShiftDetector
    window: WindowShiftDetector

    @classmethod
    def from_config(cls, config: DriftConfig) -> DriftDetectors:
        return cls(
            PosteriorShiftDetector.from_config(config), WindowShiftDetector.from_config(config)
        )


def judge_drift(
    detectors: DriftDetectors, message: PopulationPosterior, recent: Interval | None = None
) -> PopulationPosterior:
    """Compare the new posterior with the shift detector's reference and, given
    the recent-window fit's population effect, the recent with the all-time
    effect (monitoring.drift); record the verdict in the message: the drift
    agent alerts on ``drift_detected`` (``drift_kinds`` says which detectors);
    every worker republishes all scores when ``rescore``."""
    shift = detectors.shift
    shift.update(
        np.asarray(message.unconstrained_loc), np.asarray(message.unconstrained_scale_tril)
    )
    kinds = ["posterior_shift"] if shift.drift_detected else []
    drift = {
        "kl": shift.kl,
        "kl_location": shift.kl_location,
        "shift": shift.shift,
        "shift_z": shift.shift_z,
    }
    effect = message.summary.get("effect")
    if recent is not None and effect is not None:
        window = detectors.window
        window.update(
            GaussianSummary(recent.mean, recent.sd), GaussianSummary(effect.mean, effect.sd)
        )
        drift.update(
            window_shift=window.statistic,
            recent_effect_mean=recent.mean,
            recent_effect_sd=recent.sd,
        )
        if window.drift_detected:
            kinds.append("window_shift")
    return message.model_copy(
        update={
            "drift": drift,
            "drift_detected": bool(kinds),
            "drift_kinds": kinds,
            # A measure's first posteriors (the detector's warm-up) always rescore;
            # a new owner's detector warms up again, but its posteriors continue
            # the published sequence, and forcing every score then (after each
            # restart or rebalance) would republish all of them for nothing.
            "rescore": shift.moved or message.version <= shift.warmup + 1,
        }
    )


def register(app: faust.App, service: PopulationService) -> None:
    async def population(stream: faust.StreamT) -> None:
        async for events in stream.take_events(
            service.settings.batch_size, within=service.settings.batch_seconds
        ):
            for event in events:
                # As in the patients agent (PatientsService.process_chunks): an
                # event fetched before a rebalance is fetched again by the owner.
                if not fetched_since_rebalance(app, event.message):
                    log.info("dropped an evidence batch fetched before a rebalance")
                    continue
                batch = EvidenceBatch.model_validate_json(event.value)
                await service.keep(batch)
                service.take(batch)

    app.agent(service.topics.population_evidence, name="population")(population)
    app.timer(service.settings.population_interval_seconds, name="population-update")(service.tick)
    if service.settings.selection_interval_seconds > 0:
        # Checked as often as updates; each measure runs when due (selection_due).
        app.timer(service.settings.population_interval_seconds, name="structure-selection")(
            service.select_tick
        )
