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

Authentication: a bearer token (``Authorization: Bearer <token>``) from
``EFFICACY_LOOKUP_TOKEN`` or ``EFFICACY_LOOKUP_TOKEN_FILE``, compared in constant
time (``hmac.compare_digest`` over SHA-256 digests, so not even the length
leaks).

- 401 with ``WWW-Authenticate: Bearer`` without a credential or with a wrong one;
- 403 when the worker has no token configured: the lookup is disabled (fail
  closed; docs/pipeline.md says why this, rather than loopback-only, is the
  default).

A forwarded request carries the caller's ``Authorization`` header, and the
owner checks it again (a forwarded request is not trusted for being one). With
``EFFICACY_WEB_TLS_CERTFILE``/``KEYFILE`` faust's web server serves HTTPS (its
``web_ssl_context``), the canonical URLs are ``https://`` and forwarding
verifies the owner's certificate (``EFFICACY_WEB_TLS_CAFILE``, default the
system's trust store).

Every request, allowed or refused, is written to the ``audit`` topic before it
is answered (``streams.schemas.LookupAudit``: who, which patient, when, the
outcome; never the credential); an allowed lookup whose audit record cannot be
written is answered 503 instead of with the score. Patient ids are in the audit
topic, and in the log at debug level only.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import re
import ssl
import uuid
from typing import Literal

import aiohttp
import faust
from faust.types import TP
from faust.web import Request, Response, View
from yarl import URL

from streams.agents.patients import PatientsService
from streams.output import Producer
from streams.schemas import LookupAudit, json_bytes, utc_now
from streams.settings import Settings

log = logging.getLogger(__name__)

PATH = "/patients/{patient_id}/score"
FORWARDED_BY = "X-Efficacy-Forwarded-By"
SERVED_BY = "X-Efficacy-Served-By"
REQUEST_ID = "X-Efficacy-Request-Id"
AUTHORIZATION = "Authorization"
REALM = "living-efficacy"
MIN_TOKEN_LENGTH = 16

Outcome = Literal["allowed", "no_credential", "wrong_credential", "disabled"]


class LookupToken:
    """The bearer token the lookup requires (None: the lookup is disabled)."""

    def __init__(self, token: str | None) -> None:
        if token is not None and len(token) < MIN_TOKEN_LENGTH:
            raise ValueError(
                f"the score lookup's token has {len(token)} characters; it needs at least "
                f"{MIN_TOKEN_LENGTH} (e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')"
            )
        self._digest = None if token is None else hashlib.sha256(token.encode()).digest()

    @classmethod
    def from_settings(cls, settings: Settings) -> LookupToken:
        """``EFFICACY_LOOKUP_TOKEN``, or the first line of ``EFFICACY_LOOKUP_TOKEN_FILE``."""
        if settings.lookup_token is not None:
            return cls(settings.lookup_token.get_secret_value().strip())
        if settings.lookup_token_file is not None:
            lines = settings.lookup_token_file.read_text(encoding="utf-8").splitlines()
            return cls(lines[0].strip() if lines else "")
        return cls(None)

    @property
    def configured(self) -> bool:
        return self._digest is not None

    @property
    def who(self) -> str | None:
        """The token's identity in audit records: a prefix of its SHA-256, never the token."""
        return None if self._digest is None else f"token:sha256:{self._digest.hex()[:16]}"

    def check(self, authorization: str | None) -> Outcome:
        """The outcome of a request's ``Authorization`` header."""
        if self._digest is None:
            return "disabled"
        scheme, _, credential = (authorization or "").strip().partition(" ")
        credential = credential.strip()
        if scheme.lower() != "bearer" or not credential:
            return "no_credential"
        presented = hashlib.sha256(credential.encode("utf-8", "surrogateescape")).digest()
        return "allowed" if hmac.compare_digest(presented, self._digest) else "wrong_credential"


def server_ssl_context(settings: Settings) -> ssl.SSLContext | None:
    """The web server's TLS context (None: plain HTTP)."""
    if settings.web_tls_certfile is None or settings.web_tls_keyfile is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(settings.web_tls_certfile), str(settings.web_tls_keyfile))
    return context


def client_ssl_context(settings: Settings) -> ssl.SSLContext | None:
    """How a worker verifies the owner it forwards a lookup to (None: plain HTTP)."""
    if settings.web_tls_certfile is None:
        return None
    cafile = str(settings.web_tls_cafile) if settings.web_tls_cafile else None
    return ssl.create_default_context(cafile=cafile)


def canonical_url(settings: Settings) -> str:
    """This worker's URL as the others reach it (faust's canonical URL)."""
    scheme = "https" if settings.web_tls_certfile else "http"
    return f"{scheme}://{settings.advertised_web_host}:{settings.web_port}"


class ScoreLookup:
    """Where a patient's score lives and how to answer for it."""

    def __init__(
        self,
        app: faust.App,
        service: PatientsService,
        token: LookupToken,
        audit_topic: str,
        client_ssl: ssl.SSLContext | None = None,
        forward_timeout: float = 10.0,
    ) -> None:
        self.app = app
        self.service = service
        self.token = token
        self.audit_topic = audit_topic
        self.client_ssl = client_ssl
        self.forward_timeout = forward_timeout
        self.producer = Producer(app)

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

    async def handle(self, view: View, request: Request, patient_id: str) -> Response:
        """Authenticate, answer, audit (module docstring)."""
        forwarded_by = request.headers.get(FORWARDED_BY)
        request_id = request.headers.get(REQUEST_ID, "") if forwarded_by else ""
        if not re.fullmatch(r"[0-9a-f]{32}", request_id):
            request_id = uuid.uuid4().hex
        outcome = self.token.check(request.headers.get(AUTHORIZATION))
        if outcome == "allowed":
            response = await self.answer(view, request, patient_id, request_id)
        else:
            response = self.refused(view, outcome)
        served_by = response.headers.get(SERVED_BY, self.url)
        record = LookupAudit(
            event_id=f"audit:{uuid.uuid4().hex}",
            event_time=utc_now(),
            request_id=request_id,
            patient_id=patient_id[:1024],
            outcome=outcome,
            status=response.status,
            who=self.token.who if outcome == "allowed" else None,
            client=getattr(request, "remote", None),
            forwarded_by=forwarded_by,
            forwarded_to=served_by if served_by != self.url else None,
            worker=self.url,
        )
        if not await self.audit(record) and outcome == "allowed":
            return self.error(view, 503, "the lookup could not be audited: retry", None, retry=True)
        return response

    async def audit(self, record: LookupAudit) -> bool:
        """Write the audit record and wait for the broker's acknowledgement."""
        try:
            delivery = await self.producer.send(
                self.audit_topic,
                record.patient_id.encode("utf-8", "surrogateescape"),
                json_bytes(record),
            )
            await asyncio.wait_for(delivery, timeout=self.forward_timeout)
        except Exception as error:  # an unaudited lookup is refused, not a crash
            log.error("score lookup: an audit record was not written: %s", type(error).__name__)
            return False
        return True

    def refused(self, view: View, outcome: Outcome) -> Response:
        if outcome == "disabled":
            return view.json(
                {
                    "error": "the score lookup is disabled: this worker has no "
                    "EFFICACY_LOOKUP_TOKEN or EFFICACY_LOOKUP_TOKEN_FILE",
                    "status": 403,
                },
                status=403,
                headers={SERVED_BY: self.url},
            )
        challenge = f'Bearer realm="{REALM}"'
        if outcome == "wrong_credential":
            challenge += ', error="invalid_token"'
        return view.json(
            {"error": "a valid bearer token is required", "status": 401},
            status=401,
            headers={SERVED_BY: self.url, "WWW-Authenticate": challenge},
        )

    async def answer(
        self, view: View, request: Request, patient_id: str, request_id: str = ""
    ) -> Response:
        """The answer to an authenticated request: from the table here, or the owner's."""
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
        return await self.forward(view, request, owner, partition, patient_id, request_id)

    def local(self, view: View, patient_id: str, partition: int) -> Response:
        reason = self.unsettled(partition)
        if reason is not None:
            return self.unavailable(view, partition, f"partition {partition} {reason}")
        record = self.service.load(patient_id)
        if record is None:
            return self.error(view, 404, "unknown patient", partition)
        if record.published_score_json is None:
            return self.error(view, 404, "no score yet for this patient", partition)
        log.debug("score of %s served from partition %d", patient_id, partition)
        return view.bytes(
            record.published_score_json,
            content_type="application/json",
            headers={SERVED_BY: self.url},
        )

    async def forward(
        self,
        view: View,
        request: Request,
        owner: str,
        partition: int,
        patient_id: str,
        request_id: str,
    ) -> Response:
        target = URL(owner).with_path(request.url.path).with_query(request.url.query)
        log.debug("score of %s: forwarding to %s (partition %d)", patient_id, owner, partition)
        headers = {FORWARDED_BY: self.url, REQUEST_ID: request_id}
        if AUTHORIZATION in request.headers:  # the owner checks the caller's credential
            headers[AUTHORIZATION] = request.headers[AUTHORIZATION]
        try:
            async with self.app.http_client.get(
                target,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=self.forward_timeout),
                ssl=self.client_ssl if self.client_ssl is not None else True,
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
        self, view: View, status: int, reason: str, partition: int | None, retry: bool = False
    ) -> Response:
        headers = {SERVED_BY: self.url}
        if retry:
            headers["Retry-After"] = "1"
        body: dict = {"error": reason, "status": status}
        if partition is not None:
            body["partition"] = partition
        return view.json(body, status=status, headers=headers)


def register(
    app: faust.App, service: PatientsService, settings: Settings, audit_topic: str
) -> ScoreLookup:
    """Add the score lookup view to the app's web server."""
    token = LookupToken.from_settings(settings)
    if settings.web_enabled and not token.configured:
        log.warning(
            "the score lookup is disabled: no EFFICACY_LOOKUP_TOKEN or "
            "EFFICACY_LOOKUP_TOKEN_FILE, every request is refused (403)"
        )
    lookup = ScoreLookup(app, service, token, audit_topic, client_ssl_context(settings))

    class PatientScore(View):
        """The patient's latest score (see streams.score_lookup)."""

        async def get(self, request: Request, patient_id: str) -> Response:
            return await lookup.handle(self, request, patient_id)

    app.page(PATH, name="patient_score")(PatientScore)
    return lookup
