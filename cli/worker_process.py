"""Run ``efficacy worker`` as a child process (the demo and the tests use this)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from streams.compilation_cache import ENV_VAR as COMPILATION_CACHE_VAR
from streams.data_dir import data_dir_from_env

#: Faust's log line once the worker has joined its group and recovered.
READY = r"\[\^Worker\]: Ready"


class WorkerProcess:
    """A worker subprocess with its own environment; a context manager.

    ``env`` adds EFFICACY_* settings to the current environment. Output goes to a
    log file (``log_path``) so a failing test or demo can show its tail.

    Each worker has its own data directory, and JAX's compilation cache is in it
    unless configured: workers started here (the demo's, the tests') share the
    user's cache instead (in the data directory of this process's environment) (``EFFICACY_COMPILATION_CACHE_DIR``, when neither
    ``env`` nor the environment names one), so each loads the programs the
    previous ones compiled.
    """

    def __init__(self, env: dict[str, str], loglevel: str = "info") -> None:
        self.env = {
            COMPILATION_CACHE_VAR: str(data_dir_from_env() / "jax"),
            **os.environ,
            **env,
        }
        self.loglevel = loglevel
        self.process: subprocess.Popen[bytes] | None = None
        handle, name = tempfile.mkstemp(prefix="efficacy-worker-", suffix=".log")
        os.close(handle)
        self.log_path = Path(name)

    def __enter__(self) -> WorkerProcess:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> None:
        """Start the worker (again, after ``stop``/``kill``: the log is appended to)."""
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "cli.main", "worker", "--loglevel", self.loglevel],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = 120.0) -> int | None:
        """SIGTERM, wait for the clean shutdown (which lets a population fit in
        progress finish), SIGKILL if it hangs. Returns the exit code."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        return self.process.returncode

    def wait(self, timeout: float) -> int | None:
        """Wait up to ``timeout`` seconds for the worker to exit by itself; its
        exit code, or None while it still runs."""
        if self.process is None:
            return None
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def kill(self) -> int | None:
        """SIGKILL, as a crash: no shutdown, no offset commit, no flush. Returns the exit code."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        return self.process.returncode

    def wait_for_log(self, pattern: str, count: int = 1, timeout: float = 120.0) -> None:
        """Wait until ``pattern`` (a regex) occurs ``count`` times in the log, e.g.
        ``READY`` once the worker is consuming. Raises RuntimeError if the worker
        exits and TimeoutError after ``timeout`` seconds, with the log's tail."""
        deadline = time.monotonic() + timeout
        while len(re.findall(pattern, self.log_text())) < count:
            if not self.alive():
                raise RuntimeError(f"the worker exited:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {pattern!r} in the worker's log:\n{self.log_tail()}")
            time.sleep(0.2)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def assigned(self, topic: str) -> str:
        """The partitions of ``topic`` in the worker's latest assignment, as
        faust's table in the log shows them (e.g. "{0-1}"; "" before any)."""
        rows = re.findall(
            rf"\|[ \t]*{re.escape(topic)}[ \t]*\|[ \t]*([^|\n]*?)[ \t]*\|", self.log_text()
        )
        return rows[-1] if rows else ""

    def takeover_replay(self, changelog: str) -> tuple[int, int]:
        """For the partitions of ``changelog`` the worker's last recovery made it
        active for that it was not active for before (a takeover): the records that
        recovery read, and the records those partitions hold (from faust's
        recovery tables in the log)."""
        log = self.log_text()
        *before, highwater = recovery_tables(log, "Highwater - Active")
        starts = recovery_tables(log, "Reading Starts At - Active")[-1]
        earlier = before[-1] if before else {}
        replayed = written = 0
        for (topic, partition), last in highwater.items():
            if topic == changelog and (topic, partition) not in earlier:
                written += last + 1
                replayed += max(0, last - starts.get((topic, partition), -1))
        return replayed, written

    def log_warnings(self, lines: int = 20) -> str:
        """The last ``lines`` lines logged at WARNING or above (a failing test's
        first clue)."""
        found = re.findall(r"^.*\[(?:WARNING|ERROR|CRITICAL)\].*$", self.log_text(), re.MULTILINE)
        return "\n".join(found[-lines:])

    def log_tail(self, lines: int = 40) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def recovery_tables(log: str, title: str) -> list[dict[tuple[str, int], int]]:
    """Every table ``title`` faust's recovery logged ("Highwater - Active",
    "Reading Starts At - Active"), in order: (changelog topic, partition) ->
    offset; a ditto mark repeats the topic of the row above."""
    tables = []
    for block in log.split(f"+{title}-")[1:]:
        table, topic = {}, ""
        for line in block.splitlines()[3:]:
            if not line.startswith("|"):
                break
            cell_topic, partition, offset = (c.strip() for c in line.strip("| ").split("|"))
            topic = topic if cell_topic == "〃" else cell_topic
            table[(topic, int(partition))] = int(offset)
        tables.append(table)
    return tables
