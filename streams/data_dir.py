"""The worker's data directory: the one place it writes.

Layout under ``EFFICACY_DATA_DIR`` (default ``$XDG_CACHE_HOME/living-efficacy``,
``~/.cache/living-efficacy`` without XDG_CACHE_HOME, never the working directory):

- ``worker.lock``: held (``flock``) by the worker that uses the directory;
- ``faust/``: faust's data directory, the RocksDB stores of the tables (a cache of
  the changelog topics: a worker rebuilds it from them when it is missing);
- ``jax/``: JAX's compilation cache, unless ``EFFICACY_COMPILATION_CACHE_DIR``
  names another place (streams.compilation_cache).

Everything in it can be rebuilt, hence a cache directory. One directory per worker:
two workers on the same RocksDB stores would corrupt each other's state, so a
second worker on a directory in use stops at once with an error instead.
"""

from __future__ import annotations

import fcntl
import os
import socket
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import IO

ENV_VAR = "EFFICACY_DATA_DIR"
LOCK_NAME = "worker.lock"


class DataDirInUse(RuntimeError):
    """Another process holds the data directory's lock."""


def default_data_dir(environ: Mapping[str, str] | None = None) -> Path:
    """``$XDG_CACHE_HOME/living-efficacy``, else ``~/.cache/living-efficacy`` (else
    under the system's temporary directory, for a user without a home)."""
    environ = os.environ if environ is None else environ
    base = environ.get("XDG_CACHE_HOME", "").strip()
    if not base:
        home = environ.get("HOME", "").strip()
        base = str(Path(home) / ".cache") if home else tempfile.gettempdir()
    return Path(base).expanduser() / "living-efficacy"


def data_dir_from_env(environ: Mapping[str, str] | None = None) -> Path:
    """The data directory ENV_VAR names, or the default without it."""
    environ = os.environ if environ is None else environ
    value = environ.get(ENV_VAR, "").strip()
    return Path(value).expanduser() if value else default_data_dir(environ)


def claim(data_dir: Path) -> IO[str]:
    """Create ``data_dir`` and take its lock for this process's lifetime; the
    returned file holds it (closing it, or the process ending, releases it).
    Raises DataDirInUse when another process holds it."""
    data_dir.mkdir(parents=True, exist_ok=True)
    handle = (data_dir / LOCK_NAME).open("a+", encoding="utf-8")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise DataDirInUse(
            f"the data directory {data_dir} is in use by {holder}: give each worker "
            f"its own {ENV_VAR}"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    handle.flush()
    return handle
