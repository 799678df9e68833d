"""Traced programs kept on disk (``jax.export``), so a later process neither traces
nor lowers them.

JAX's persistent compilation cache saves the XLA *compile* of a jitted function,
but every process still traces the Python function to a jaxpr and lowers it to
StableHLO before it can look the compile up: for ``efficacy fit`` on sleepstudy
that was ~4.7 s of a ~6 s second run (the numpyro model, its guide and the ELBO's
gradient traced again every time). ``ExportCache`` serialises each traced program
once (``jax.export.Exported``) and later calls deserialise it instead; the compile
of the deserialised program still goes through the persistent compilation cache.

A program is found again only under the digest of everything that went into
tracing it:

- the function's name (the caller's, plus its module and qualified name);
- the source of the ``model`` package (every ``.py`` file of it) and the versions
  of jax, jaxlib and numpyro, so any edit or upgrade traces afresh;
- the caller's static configuration (``repr``: frozen pydantic configs, ints);
- the structure, shapes and dtypes of the arguments, x64 and the backend.

A changed shape, configuration or source is a miss that traces and writes a new
entry, never a call of a wrong program. Unreadable or corrupt entries are misses
too. The directory is the caller's (the CLI configures it); this module keeps no
state beyond each ``ExportCache``.

Calling the exported program is the same computation as calling the jitted
function: the exported module is the jitted function's own lowering, compiled by
the same XLA (tests/test_exported.py compares a fit both ways).
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import tempfile
from collections.abc import Callable
from functools import cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: Bump when the on-disk layout of an entry changes.
FORMAT = 1
SUFFIX = ".jaxexport"


@cache
def source_digest() -> str:
    """sha256 of the model package's source (every .py file, by name) and of the
    versions of the libraries that trace it."""
    digest = hashlib.sha256(f"format {FORMAT}\n".encode())
    for package in ("jax", "jaxlib", "numpyro"):
        try:
            digest.update(f"{package} {version(package)}\n".encode())
        except PackageNotFoundError:
            digest.update(f"{package} missing\n".encode())
    root = Path(__file__).resolve().parent
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()


class ExportCache:
    """A directory of exported programs; ``wrap`` routes a jitted function through it.

    ``hits``, ``misses`` and ``written`` count this object's lookups (tests and
    benchmarks read them).
    """

    @classmethod
    def beside(cls, compilation_cache: Path | None) -> ExportCache | None:
        """The export cache of a JAX compilation cache directory (its ``exported/``
        folder, which JAX's cache leaves be), or None without one."""
        return None if compilation_cache is None else cls(compilation_cache / "exported")

    def __init__(self, directory: Path | str) -> None:
        self.directory = Path(directory)
        self._loaded: dict[str, tuple[Any, Any]] = {}  # key -> (jitted caller, out treedef)
        self.hits = 0
        self.misses = 0
        self.written = 0

    def wrap(
        self,
        name: str,
        fn: Callable[..., Any],
        static: Any = (),
        prepare: Callable[[], None] | None = None,
    ) -> Callable[..., Any]:
        """``fn`` (a jitted function whose static arguments are already bound),
        called through the cache: same arguments, same results.

        ``static``: everything fixed in ``fn`` that its arguments do not show (the
        configs bound into it); part of the key. ``prepare()`` runs before ``fn``
        is traced on a miss (set-up a trace would otherwise have done as a side
        effect of another, now cached, function)."""

        def call(*args: Any, **kwargs: Any) -> Any:
            return self.call(name, fn, static, prepare, args, kwargs)

        return call

    def key(self, name: str, fn: Callable[..., Any], static: Any, args: Any) -> str:
        import jax

        leaves, tree = jax.tree_util.tree_flatten(args)
        digest = hashlib.sha256()
        for part in (
            source_digest(),
            name,
            getattr(fn, "__module__", ""),
            getattr(fn, "__qualname__", type(fn).__name__),
            repr(static),
            str(tree),
            ";".join(str(jax.typeof(leaf)) for leaf in leaves),
            str(jax.config.jax_enable_x64),
            jax.default_backend(),
        ):
            digest.update(str(part).encode() + b"\0")
        return digest.hexdigest()

    def call(
        self,
        name: str,
        fn: Callable[..., Any],
        static: Any,
        prepare: Callable[[], None] | None,
        args: tuple,
        kwargs: dict[str, Any],
    ) -> Any:
        import jax

        leaves, in_tree = jax.tree_util.tree_flatten((args, kwargs))
        key = self.key(name, fn, static, (args, kwargs))
        entry = self._loaded.get(key)
        if entry is None:
            found = self._read(key)
            if found is None:
                self.misses += 1
                if prepare is not None:
                    prepare()
                exported, out_tree = self._export(fn, in_tree, leaves)
                serialized = bytes(exported.serialize())
                self._write(key, serialized, out_tree)
                # Run what a later process will load, not the in-memory export: the
                # round trip drops weak types from the results, and the programs
                # called with them (the next chunk's) must see the same arguments
                # in both, or their keys would differ from the first run's.
                found = jax.export.deserialize(bytearray(serialized)), out_tree
            else:
                self.hits += 1
            exported, out_tree = found
            entry = self._loaded[key] = (self._runner(exported), out_tree)
        runner, out_tree = entry
        return jax.tree_util.tree_unflatten(out_tree, runner(*_committed(leaves)))

    @staticmethod
    def _export(fn: Callable[..., Any], in_tree: Any, leaves: list[Any]) -> tuple[Any, Any]:
        import jax

        out_trees = []

        def flat(*flat_args: Any) -> list[Any]:
            args, kwargs = jax.tree_util.tree_unflatten(in_tree, flat_args)
            out_leaves, out_tree = jax.tree_util.tree_flatten(fn(*args, **kwargs))
            out_trees.append(out_tree)
            return out_leaves

        exported = jax.export.export(jax.jit(flat))(*leaves)
        return exported, out_trees[-1]

    @staticmethod
    def _runner(exported: Any) -> Callable[..., Any]:
        """One jitted caller per program: repeated calls take jit's fast path."""
        import jax

        return jax.jit(exported.call)

    def _path(self, key: str) -> Path:
        return self.directory / f"{key}{SUFFIX}"

    def _read(self, key: str) -> tuple[Any, Any] | None:
        path = self._path(key)
        try:
            payload = path.read_bytes()
        except OSError:
            return None
        try:
            import jax

            record = pickle.loads(payload)
            if record.get("format") != FORMAT or record.get("key") != key:
                raise ValueError("written under another key or format")
            return jax.export.deserialize(bytearray(record["exported"])), record["out_tree"]
        except Exception as error:  # a bad entry is a miss, never a wrong call
            log.warning("ignoring unreadable exported program %s: %s", path, error)
            return None

    def _write(self, key: str, serialized: bytes, out_tree: Any) -> None:
        record = {"format": FORMAT, "key": key, "exported": serialized, "out_tree": out_tree}
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            handle, temporary = tempfile.mkstemp(dir=self.directory, prefix=".tmp-")
            with os.fdopen(handle, "wb") as file:
                pickle.dump(record, file)
            os.replace(temporary, self._path(key))  # atomic: readers see all or nothing
            self.written += 1
        except OSError as error:
            log.warning("could not keep exported program in %s: %s", self.directory, error)


def _committed(leaves: list[Any]) -> list[Any]:
    """Arrays committed to the default device: jit keys its compiled calls on
    commitment too, and a fit's first call (a fresh random key) would otherwise
    compile the same program again for its later calls (outputs, committed)."""
    import jax
    import numpy as np

    device = jax.devices()[0]
    return [
        jax.device_put(leaf, device) if isinstance(leaf, jax.Array | np.ndarray) else leaf
        for leaf in leaves
    ]


def through(
    cache: ExportCache | None,
    name: str,
    fn: Callable[..., Any],
    static: Any = (),
    prepare: Callable[[], None] | None = None,
) -> Callable[..., Any]:
    """``fn`` through ``cache``, or ``fn`` itself without one."""
    if cache is None:
        return fn
    return cache.wrap(name, fn, static, prepare)
