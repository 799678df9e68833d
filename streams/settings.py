"""Worker configuration from the environment (pydantic-settings).

Every setting reads ``EFFICACY_<NAME>``; the bootstrap servers also read the
conventional ``KAFKA_BOOTSTRAP_SERVERS``. SASL and SSL settings pass through to
the Kafka client for real clusters.
"""

from __future__ import annotations

import os
import socket
import ssl
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from monitoring.drift import DriftConfig
from streams.compilation_cache import parse_directory
from streams.data_dir import default_data_dir

#: Environment variables of settings that were replaced, and what replaced them.
RETIRED_SETTINGS = {
    "EFFICACY_STATE_CACHE_PATIENTS": "EFFICACY_STATE_CACHE_MB (memory for the parsed "
    "records, in MB; 0: no cache)",
}


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="EFFICACY_",
        extra="ignore",
        populate_by_name=True,
        env_nested_delimiter="__",
    )

    bootstrap_servers: str = Field(
        default="127.0.0.1:9092",
        validation_alias=AliasChoices("EFFICACY_BOOTSTRAP_SERVERS", "KAFKA_BOOTSTRAP_SERVERS"),
        description="comma-separated host:port list",
    )
    app_id: str = "living-efficacy"
    topic_prefix: str = "efficacy."
    partitions: int = Field(default=4, ge=1)
    replication_factor: int = Field(default=1, ge=1)
    standby_replicas: int = Field(
        default=1,
        ge=0,
        description="standby copies of each table partition kept by other workers: a "
        "survivor takes over a lost worker's patients without replaying their changelog",
    )
    store_url: str = Field(default="memory://", description="memory:// or rocksdb:// (production)")
    data_dir: Path = Field(
        default_factory=default_data_dir,
        description="the one directory the worker writes to (its lock, faust's RocksDB "
        "stores in faust/, JAX's compilation cache in jax/); one per worker. Default "
        "$XDG_CACHE_HOME/living-efficacy (~/.cache/living-efficacy)",
    )
    compilation_cache_dir: Path | None = Field(
        default=None,
        description="JAX's persistent compilation cache: a restarted worker loads its "
        "compiled scoring and fits instead of compiling them again. Default: jax/ in the "
        "data directory; empty or 'none': compile in every process; a directory that is "
        "not writable is logged and skipped",
    )
    metrics_port: int = Field(
        default=9108, ge=0, le=65535, description="Prometheus /metrics port (0: any free port)"
    )
    metrics_addr: str = Field(default="127.0.0.1", description="address /metrics binds to")
    metrics_enabled: bool = True
    web_port: int = Field(
        default=6066, ge=1, le=65535, description="faust's web server (score lookup) port"
    )
    web_enabled: bool = True
    web_bind: str = Field(
        default="127.0.0.1", description="address the web server binds to (0.0.0.0: every one)"
    )
    web_host: str | None = Field(
        default=None,
        description="host name other workers reach this worker's web server at (faust's "
        "canonical URL, used to forward score lookups); default: the bind address, or "
        "the machine's host name when binding to every address",
    )
    lookup_token: SecretStr | None = Field(
        default=None,
        description="bearer token the score lookup requires (Authorization: Bearer ...; at "
        "least 16 characters); without it or EFFICACY_LOOKUP_TOKEN_FILE the lookup refuses "
        "every request",
    )
    lookup_token_file: Path | None = Field(
        default=None,
        description="file holding the lookup's bearer token (its first line), instead of "
        "EFFICACY_LOOKUP_TOKEN",
    )
    web_tls_certfile: Path | None = Field(
        default=None,
        description="certificate chain (PEM) the web server (score lookup) serves HTTPS with; "
        "its name must match EFFICACY_WEB_HOST for the other workers",
    )
    web_tls_keyfile: Path | None = Field(
        default=None, description="private key (PEM) of EFFICACY_WEB_TLS_CERTFILE"
    )
    web_tls_cafile: Path | None = Field(
        default=None,
        description="CA bundle a worker verifies the other workers' web certificates with "
        "when it forwards a lookup (default: the system's trust store)",
    )

    measures_file: Path | None = Field(
        default=None, description="measure catalogue (TOML); default: the shipped measures.toml"
    )
    time_origin: datetime = Field(
        default=datetime(2026, 1, 1, tzinfo=UTC),
        description="programme start: time trends are measured from here",
    )
    time_scale_days: float = Field(default=30.0, gt=0.0, description="time-trend prior unit")
    half_life_days: float | None = Field(
        default=None, gt=0.0, description="forgetting half-life of evidence (None: keep all)"
    )
    recent_half_life_days: float | None = Field(
        default=7.0,
        gt=0.0,
        description="fast forgetting of the recent-window fit that drift monitoring compares "
        "with the all-time fit (None: no recent-window fit)",
    )
    batch_size: int = Field(
        default=5000,
        ge=1,
        description="most raw records in one step of the patients agent (a step holds the "
        "event loop for ~70 µs a record plus ~150 µs a patient it touches)",
    )
    batch_patients: int = Field(
        default=1000,
        ge=1,
        description="most patients one step of the patients agent touches (a step of a "
        "backlog whose patients recur pays each patient's scoring, save and messages once "
        "for several readings)",
    )
    batch_seconds: float = Field(default=0.1, gt=0.0, description="longest wait to fill a batch")
    state_cache_mb: int = Field(
        default=1024,
        ge=0,
        description="memory for the parsed patient records the patients agent keeps between "
        "batches (a record costs about 4 times its table value: ~14 KB at 10 readings of one "
        "measure, ~40 KB at 30 readings of three; 0: parse every record from the table on "
        "every batch)",
    )
    producer_linger_ms: int = Field(
        default=5,
        ge=0,
        description="how long the worker's producer waits to fill a request (faust's default "
        "0 sends one as soon as a message is ready; no measurable change on loopback, "
        "fewer requests on a real network); adds at most this much latency",
    )
    producer_request_timeout_seconds: float = Field(
        default=120.0,
        gt=0.0,
        description="how long a produce request may wait for the broker's acknowledgement "
        "(Kafka's default delivery timeout; faust's is 1200 s): a request that times out "
        "fails its records, and the worker stops before the offsets of the events that "
        "caused them are committed",
    )
    population_interval_seconds: float = Field(
        default=2.0, gt=0.0, description="how often the population agent considers an update"
    )
    group_backlog_horizon_seconds: float = Field(
        default=10.0,
        ge=0.0,
        description="population fits are paced while any worker of the consumer group has raw "
        "records older than this many seconds not committed (streams.group_backlog; polled every "
        "population interval; 0: paced by this worker's own backlog only)",
    )
    rescore_max_delay_seconds: float = Field(
        default=30.0,
        ge=0.0,
        description="how long the rescoring of every patient after a new population posterior "
        "may wait while the raw topics have a backlog (the backlog's patients are scored under "
        "the new posterior as their readings are applied; 0: rescore at once)",
    )
    population_backlog_share: float = Field(
        default=0.2,
        gt=0.0,
        le=1.0,
        description="while the raw topics have a backlog, the most of the worker's time a "
        "measure's population fits take: a fit of d seconds is followed by the next no sooner "
        "than d × (1 − share) / share seconds after it (at most 60 s; 1: every interval)",
    )
    population_min_patients: int = Field(
        default=5, ge=1, description="patients with evidence before the first population fit"
    )
    selection_interval_seconds: float = Field(
        default=3600.0,
        ge=0.0,
        description="structure selection of every owned measure at most this often, when its "
        "evidence changed (0: never)",
    )
    selection_min_patients: int = Field(
        default=30, ge=4, description="patients with evidence before the first structure selection"
    )
    selection_folds: int = Field(
        default=5, ge=2, le=20, description="folds of the selection's cross-validation"
    )
    pathways: dict[str, str] = Field(
        default_factory=lambda: {"non_responder": "alternative_pathway"},
        description="recommended action per call, as JSON, e.g. "
        '{"non_responder": "clinical_escalation"}',
    )
    drift: DriftConfig = Field(
        default_factory=DriftConfig,
        description="drift thresholds, e.g. EFFICACY_DRIFT__SHIFT_THRESHOLD=3.5",
    )
    max_future_days: float = Field(
        default=1.0, ge=0.0, description="readings further in the future are rejected"
    )
    max_age_days: float = Field(
        default=3650.0, gt=0.0, description="readings older than this are rejected"
    )

    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = "PLAIN"
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ssl_cafile: Path | None = None
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None

    @field_validator("compilation_cache_dir", mode="before")
    @classmethod
    def _cache_off(cls, value: object) -> object:
        return parse_directory(value) if isinstance(value, str) else value

    @model_validator(mode="before")
    @classmethod
    def _no_retired_settings(cls, values: object) -> object:
        """A setting that no longer exists is an error, not silently ignored."""
        for name, instead in RETIRED_SETTINGS.items():
            if name in os.environ:
                raise ValueError(f"{name} is no longer read: set {instead}")
        return values

    @model_validator(mode="after")
    def _cache_in_data_dir(self) -> Settings:
        if "compilation_cache_dir" not in self.model_fields_set:
            self.compilation_cache_dir = self.data_dir / "jax"
        return self

    @model_validator(mode="after")
    def _credentials_complete(self) -> Settings:
        if self.security_protocol.startswith("SASL") and not (
            self.sasl_username and self.sasl_password
        ):
            raise ValueError(
                f"security_protocol {self.security_protocol} needs EFFICACY_SASL_USERNAME "
                "and EFFICACY_SASL_PASSWORD"
            )
        if bool(self.ssl_certfile) != bool(self.ssl_keyfile):
            raise ValueError("EFFICACY_SSL_CERTFILE and EFFICACY_SSL_KEYFILE go together")
        if self.lookup_token is not None and self.lookup_token_file is not None:
            raise ValueError("set EFFICACY_LOOKUP_TOKEN or EFFICACY_LOOKUP_TOKEN_FILE, not both")
        if bool(self.web_tls_certfile) != bool(self.web_tls_keyfile):
            raise ValueError("EFFICACY_WEB_TLS_CERTFILE and EFFICACY_WEB_TLS_KEYFILE go together")
        return self

    @property
    def faust_dir(self) -> Path:
        """faust's data directory (its RocksDB stores), inside the data directory."""
        return self.data_dir / "faust"

    @property
    def broker_url(self) -> str:
        """Faust's broker URL: kafka:// for every host in the bootstrap list."""
        return ";".join(f"kafka://{host.strip()}" for host in self.bootstrap_servers.split(","))

    @property
    def advertised_web_host(self) -> str:
        """The host in this worker's canonical URL: the group's other members
        forward score lookups there, so it must reach the bound address."""
        if self.web_host:
            return self.web_host
        if self.web_bind in ("", "0.0.0.0", "::"):
            return socket.gethostname()
        return self.web_bind

    def topic(self, name: str) -> str:
        return f"{self.topic_prefix}{name}"

    def source_of(self, topic: str) -> str:
        """A topic's name without the prefix: the source label of its records."""
        return topic.removeprefix(self.topic_prefix)

    def ssl_context(self) -> ssl.SSLContext | None:
        if self.security_protocol not in ("SSL", "SASL_SSL"):
            return None
        context = ssl.create_default_context(
            cafile=str(self.ssl_cafile) if self.ssl_cafile else None
        )
        if self.ssl_certfile and self.ssl_keyfile:
            context.load_cert_chain(str(self.ssl_certfile), str(self.ssl_keyfile))
        return context
