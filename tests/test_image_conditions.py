"""The worker in its image's conditions, without Docker (no engine here): run as an
unprivileged user (nobody), from a read-only copy of the project, with nothing
writable but its data directory (tests/unprivileged.py: a mount namespace, and
setpriv). Two such workers with their own data directories share a programme's
partitions end to end, every patient gets a score; each keeps its RocksDB
stores, compilation cache and lock in its own directory, and a third worker on
a directory in use stops with an error. A sandbox that cannot be prepared fails
the test."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest
from unprivileged import NOBODY, command_in_sandbox, plan

from cli.kafka_io import read_until
from cli.programme import build_programme
from cli.simulate import publish
from cli.worker_process import READY
from streams.settings import Settings

pytestmark = pytest.mark.kafka

ROOT = Path(__file__).resolve().parents[1]
#: What the Dockerfile copies into the image.
PACKAGES = ("model", "streams", "monitoring", "cli")
MEASURE = "resting_heart_rate"
PATIENTS = 12


def read_only_copy(destination: Path) -> Path:
    """The project's packages, as the image has them, without write permission."""
    for package in PACKAGES:
        shutil.copytree(ROOT / package, destination / package,
                        ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
    for path in [destination, *destination.rglob("*")]:
        path.chmod(path.stat().st_mode & ~0o222 | 0o444 | (0o111 if path.is_dir() else 0))
    return destination


class SandboxedWorker:
    """``efficacy worker`` as nobody in the sandbox; output in a log file."""

    def __init__(
        self, app: Path, data_dir: Path, env: dict[str, str], logs: Path, name: str
    ) -> None:
        if not data_dir.exists():
            data_dir.mkdir()
            os.chown(data_dir, NOBODY, NOBODY)
        self.data_dir = data_dir
        self.stash = Path(tempfile.mkdtemp(prefix="sandbox-stash-"))
        self.log_path = logs / f"{name}.log"
        self.command = command_in_sandbox(
            [sys.executable, "-m", "cli.main", "worker", "--loglevel", "info"],
            readable=[Path(sys.base_prefix), Path(sys.prefix), app],
            writable=[data_dir],
            hide=[ROOT],
            cwd=app,
            env={
                "PATH": "/usr/bin:/bin",
                "HOME": "/nonexistent",
                "LANG": "C.UTF-8",
                "EFFICACY_DATA_DIR": str(data_dir),
                **env,
            },
            stash=self.stash,
        )
        self.process: subprocess.Popen | None = None

    def start(self) -> SandboxedWorker:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL)  # fmt: skip
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_ready(self, timeout: float) -> None:
        waited = 0.0
        while waited < timeout:
            if self.process.poll() is not None:
                pytest.fail(f"the sandboxed worker exited ({self.process.returncode}):\n"
                            f"{self.log()[-4000:]}")  # fmt: skip
            if re.search(READY, self.log()):
                return
            asyncio.run(asyncio.sleep(1.0))
            waited += 1.0
        pytest.fail(f"the sandboxed worker was not ready in {timeout} s:\n{self.log()[-4000:]}")

    def stop(self) -> int | None:
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.terminate()  # unshare passes SIGTERM on: it is the worker (exec)
            try:
                self.process.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        shutil.rmtree(self.stash, ignore_errors=True)
        return self.process.returncode


def test_the_sandbox_covers_what_nobody_cannot_reach_and_the_checkout():
    covers = plan([Path(sys.base_prefix), Path(sys.prefix)], [], [ROOT])
    assert any(ROOT.is_relative_to(c) for c in covers)
    for path in (Path(sys.base_prefix), Path(sys.prefix)):
        hidden = [p for p in path.parents if not p.stat().st_mode & 0o001]
        assert all(any(h.is_relative_to(c) for c in covers) for h in hidden), (path, covers)


def test_two_unprivileged_workers_on_a_read_only_copy_score_every_patient(
    kafka_bootstrap, tmp_path
):
    if os.geteuid() != 0:
        pytest.fail("this test prepares its sandbox as root (mount namespace, setpriv)")
    app = read_only_copy(tmp_path / "app")
    run_id = uuid.uuid4().hex[:8]
    prefix = f"image-{run_id}."
    env = {
        "EFFICACY_BOOTSTRAP_SERVERS": kafka_bootstrap,
        "EFFICACY_TOPIC_PREFIX": prefix,
        "EFFICACY_APP_ID": f"image-{run_id}",
        "EFFICACY_PARTITIONS": "4",
        "EFFICACY_STORE_URL": "rocksdb://",
        "EFFICACY_WEB_ENABLED": "false",
        "EFFICACY_METRICS_PORT": "0",
    }
    logs = tmp_path / "logs"
    logs.mkdir()
    workers = [SandboxedWorker(app, tmp_path / f"data-{i}", env, logs, f"worker-{i}")
               for i in (1, 2)]  # fmt: skip
    try:
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.wait_for_ready(timeout=300)
            # unshare, the sandbox and setpriv each exec the next: the pid is the worker's
            status = Path(f"/proc/{worker.process.pid}/status").read_text()
            uids = next(line for line in status.splitlines() if line.startswith("Uid:"))
            assert uids.split()[1:] == [str(NOBODY)] * 4, uids
            assert Path(f"/proc/{worker.process.pid}/cwd").resolve() == app

        # a third worker on a data directory in use stops at once, with the reason
        intruder = SandboxedWorker(app, workers[0].data_dir, env, logs, "intruder")
        intruder.start()
        assert intruder.process.wait(timeout=300) == 1, intruder.log()
        intruder.stop()
        assert f"data directory {workers[0].data_dir} is in use" in intruder.log()

        settings = Settings(bootstrap_servers=kafka_bootstrap, topic_prefix=prefix,
                            partitions=4, app_id=env["EFFICACY_APP_ID"])  # fmt: skip
        programme = build_programme([MEASURE], num_patients=PATIENTS, num_cohorts=3,
                                    obs_per_patient=8, seed=5)  # fmt: skip
        asyncio.run(publish(programme, settings))
        scored = asyncio.run(read_until(
            kafka_bootstrap, [prefix + "scores"],
            done=lambda rs: len({r.key for r in rs}) >= PATIENTS, timeout=420,
        ))  # fmt: skip
        missing = set(programme.truth.patients) - {r.key.decode() for r in scored}
        assert not missing, (f"{len(missing)} patients never scored",
                             [w.log()[-6000:] for w in workers])  # fmt: skip
        for worker in workers:
            assert worker.process.poll() is None, worker.log()[-4000:]
    finally:
        codes = [worker.stop() for worker in workers]
    assert {r.key.decode() for r in scored} == set(programme.truth.patients)
    assert codes == [0, 0], [w.log()[-3000:] for w in workers]
    for worker in workers:
        log = worker.log()
        assert "Read-only file system" not in log and "Permission denied" not in log, log
        # both workers took part: each has RocksDB stores of its own partitions
        stores = list((worker.data_dir / "faust").rglob("*.db"))
        assert stores, log[-3000:]
        assert any((worker.data_dir / "jax").iterdir()), "no compilation cached"
        assert (worker.data_dir / "worker.lock").read_text().startswith("pid ")
        owners = {p.stat().st_uid for p in worker.data_dir.rglob("*")}
        assert owners == {NOBODY}, owners
    # nothing was written in the copy of the project (no byte code either)
    assert not list(app.rglob("__pycache__"))
