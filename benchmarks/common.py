"""Helpers shared by the benchmark scripts: machine description, timing, output."""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jax

jax.config.update("jax_enable_x64", True)

RESULTS = Path(__file__).resolve().parent / "results"


def say(message: str) -> None:
    """Progress line on stderr with the elapsed wall time (stdout stays clean)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as handle:
            names = [line.split(":", 1)[1].strip() for line in handle if "model name" in line]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores_visible": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jax_backend": jax.default_backend(),
        "float64": bool(jax.config.read("jax_enable_x64")),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def timed(function: Callable[[], Any]) -> tuple[Any, float]:
    """(result, seconds) of one call. Callers make the result concrete (numpy)."""
    started = time.perf_counter()
    result = function()
    return result, time.perf_counter() - started


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (MB; ru_maxrss is in kB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def write_json(name: str, payload: dict[str, Any]) -> Path:
    """Write ``payload`` to benchmarks/results/<name>.json and return the path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2, default=_jsonable) + "\n")
    return path


def _jsonable(value: Any) -> Any:
    """numpy scalars and arrays to plain JSON values."""
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
