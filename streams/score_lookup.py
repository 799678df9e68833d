"""Score lookup over HTTP, for systems that ask rather than subscribe:

    GET /patients/{patient_id}/score

on any worker's web server (faust, ``EFFICACY_WEB_PORT``). The answer is the
patient's latest ``EfficacyScore`` exactly as last sent to the scores topic (every
measure scored so far), read from the patients table of the worker that owns the
patient's partition; another worker forwards the request there and returns the
owner's answer.

- 200: the score (``application/json``);
- 404: no such patient, or no score yet (JSON ``{"error": ...}``);
- 503: the partition has no known owner, is being rebalanced or recovered, or
  its owner did not answer: retry.

Routing is ours, not faust's ``table_route``: faust would hash the JSON-encoded
table key, while the patients table places a key by Kafka's default partitioner
over the raw patient id (``KeyPartitionedTable``). The owner of that partition
is the group member the assignor lists for it in the table's changelog
distribution (every member's active partitions with its canonical URL, from
the group's last assignment). A forwarded request carries ``FORWARDED_BY``; a
worker that gets one for a partition it does not own answers 503 rather than
forwarding again (assignments disagree only while the group rebalances).
Every answer names the worker that read the table in ``SERVED_BY``.

Patient ids are logged at debug level only.
"""

from __future__ import annotations

import logging

import aiohttp
import faust
from faust.types import TP
from faust.web import Request, Response, View
from yarl import URL

from streams.agents.patients import PatientsService

log = logging.getLogger(__name__)

PATH = "/patients/{patient_id}/score"
FORWARDED_BY = "X-Efficacy-Forwarded-By"
SERVED_BY = "X-Efficacy-Served-By"


class ScoreLookup:
    """Where a patient's score lives and how to answer for it."""

    def __init__(
        self, app: faust.App, service: PatientsService, forward_timeout: float = 10.0
    ) -> None:
        self.app = app
        self.service = service
        self.forward_timeout = forward_timeout

    @property
    def url(self) -> str:
        """This worker's canonical URL, as the assignor lists it."""
        return str(self.app.conf.canonical_url)

    @property
    def changelog_topic(self) -> str:
        return self.service.table.changelog_topic.get_topic_name()

    def partition_of(self, patient_id: str) -> int:
        """The patients-table partition of a patient: the table's own placement."""
        return self.service.table.partition_for_key(patient_id)

    def owns(self, partition: int) -> bool:
        return TP(self.changelog_topic, partition) in self.app.assignor.assigned_actives()

    def owner_of(self, partition: int) -> str | None:
        """The canonical URL of the member actively owning ``partition`` in the
        group's last assignment, or None when no member has it."""
        topic = self.changelog_topic
        for url, topics in self.app.assignor.table_metadata(topic).items():
            if partition in topics.get(topic, ()):
                return str(url)
        return None

    def unsettled(self, partition: int) -> str | None:
        """Why this worker's copy of an owned partition cannot be trusted now
        (None: it can)."""
        recovery = self.app.tables.recovery
        if recovery.in_recovery and TP(self.changelog_topic, partition) in recovery.active_tps:
            return "is being recovered from its changelog"
        if self.app.rebalancing:
            return "is being rebalanced"
        return None

    async def answer(self, view: View, request: Request, patient_id: str) -> Response:
        partition = self.partition_of(patient_id)
        if self.owns(partition):
            return self.local(view, patient_id, partition)
        forwarded_by = request.headers.get(FORWARDED_BY)
        if forwarded_by:
            return self.unavailable(
                view,
                partition,
                f"partition {partition} was forwarded here by {forwarded_by}, but this "
                "worker does not own it (the group is rebalancing)",
            )
        owner = self.owner_of(partition)
        if owner is None:
            return self.unavailable(view, partition, f"no worker owns partition {partition} yet")
        if owner == self.url:
            return self.unavailable(
                view, partition, f"partition {partition} is being assigned to this worker"
            )
        return await self.forward(view, request, owner, partition, patient_id)

    def local(self, view: View, patient_id: str, partition: int) -> Response:
        reason = self.unsettled(partition)
        if reason is not None:
            return self.unavailable(view, partition, f"partition {partition} {reason}")
        record = self.service.load(patient_id)
        if record is None:
            return self.error(view, 404, "unknown patient", partition)
        if record.published_score is None:
            return self.error(view, 404, "no score yet for this patient", partition)
        log.debug("score of %s served from partition %d", patient_id, partition)
        return view.bytes(
            record.published_score.encode(),
            content_type="application/json",
            headers={SERVED_BY: self.url},
        )

    async def forward(
        self, view: View, request: Request, owner: str, partition: int, patient_id: str
    ) -> Response:
        target = URL(owner).with_path(request.url.path).with_query(request.url.query)
        log.debug("score of %s: forwarding to %s (partition %d)", patient_id, owner, partition)
        try:
            async with self.app.http_client.get(
                target,
                headers={FORWARDED_BY: self.url},
                timeout=aiohttp.ClientTimeout(total=self.forward_timeout),
            ) as response:
                body = await response.read()
                return view.bytes(
                    body,
                    content_type=response.content_type,
                    status=response.status,
                    headers={SERVED_BY: response.headers.get(SERVED_BY, owner)},
                )
        except (aiohttp.ClientError, TimeoutError) as error:
            log.warning(
                "score lookup: the owner %s of partition %d did not answer: %s",
                owner,
                partition,
                type(error).__name__,
            )
            return self.unavailable(
                view, partition, f"the owner {owner} of partition {partition} did not answer"
            )

    def unavailable(self, view: View, partition: int, reason: str) -> Response:
        return self.error(view, 503, reason, partition, retry=True)

    def error(
        self, view: View, status: int, reason: str, partition: int, retry: bool = False
    ) -> Response:
        headers = {SERVED_BY: self.url}
        if retry:
            headers["Retry-After"] = "1"
        return view.json(
            {"error": reason, "status": status, "partition": partition},
            status=status,
            headers=headers,
        )


def register(app: faust.App, service: PatientsService) -> ScoreLookup:
    """Add the score lookup view to the app's web server."""
    lookup = ScoreLookup(app, service)

    class PatientScore(View):
        """The patient's latest score (see streams.score_lookup)."""

        async def get(self, request: Request, patient_id: str) -> Response:
            return await lookup.answer(self, request, patient_id)

    app.page(PATH, name="patient_score")(PatientScore)
    return lookup
