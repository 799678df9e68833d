"""JAX's persistent compilation cache, for the worker and for ``efficacy fit``.

Every process compiles its jitted functions (the population fit, the scoring
shapes, the summaries) once per shape. With the cache, the compiled executables
are written to a directory and the next process on the host loads them instead
of compiling again: a restarted worker has its scoring ready sooner, and a
second ``efficacy fit`` of the sleepstudy data takes a fraction of the first
(benchmarks/README.md, "Fast start").

Default directory: ``jax/`` in the data directory (``EFFICACY_DATA_DIR``, default
``$XDG_CACHE_HOME/living-efficacy``: streams.data_dir), so the worker and
``efficacy fit`` share it. ``EFFICACY_COMPILATION_CACHE_DIR`` names another one, or
switches the cache off when empty or ``none``. A directory that cannot be created
or written is logged and the process goes on compiling for itself.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

from streams.data_dir import data_dir_from_env

log = logging.getLogger(__name__)

ENV_VAR = "EFFICACY_COMPILATION_CACHE_DIR"
#: Values of ENV_VAR (any case) that switch the cache off.
OFF = frozenset({"", "none", "off", "false", "0"})

#: Bound on the compilation cache. Setting one also makes JAX lock the cache
#: directory (filelock), so workers sharing it never read a half-written entry.
COMPILATION_CACHE_BYTES = 2 * 1024**3


def default_directory(environ: Mapping[str, str] | None = None) -> Path:
    """``jax/`` in the data directory: ``$EFFICACY_DATA_DIR/jax``, else
    ``$XDG_CACHE_HOME/living-efficacy/jax`` (``~/.cache/living-efficacy/jax``)."""
    return data_dir_from_env(environ) / "jax"


def parse_directory(value: str | Path | None) -> Path | None:
    """A configured cache directory: None (off) for an empty value or ``none``."""
    if value is None:
        return None
    if isinstance(value, str) and value.strip().lower() in OFF:
        return None
    return Path(value).expanduser()


def directory_from_env(environ: Mapping[str, str] | None = None) -> Path | None:
    """The cache directory ENV_VAR names (None: off), or the default without it."""
    environ = os.environ if environ is None else environ
    if ENV_VAR not in environ:
        return default_directory(environ)
    return parse_directory(environ[ENV_VAR])


def enable_compilation_cache(directory: Path | None) -> Path | None:
    """Keep compiled XLA executables in ``directory`` across processes; returns the
    directory in use, or None (no directory given, or it is not usable: logged).

    Call before anything is compiled: JAX decides once per process, at its first
    compilation, whether the cache is used. Every compilation is cached, the small
    and fast ones too (JAX's defaults skip compilations under a second): a fit or a
    worker start is hundreds of them, and loading one costs less than compiling it.
    """
    if directory is None:
        return None
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".probe-"):
            pass
    except OSError as error:
        log.warning(
            "JAX compilation cache off: %s is not a writable directory (%s); "
            "compiling in this process only",
            directory,
            error,
        )
        return None
    import jax

    jax.config.update("jax_compilation_cache_dir", str(directory.resolve()))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    jax.config.update("jax_compilation_cache_max_size", COMPILATION_CACHE_BYTES)
    return directory
