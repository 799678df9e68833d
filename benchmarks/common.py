"""Helpers shared by the benchmark scripts: machine description, timing, output."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
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


def cpu_seconds(pid: int, thread: int | None = None) -> float:
    """User + system CPU time of a process so far (s); of one of its threads
    with ``thread`` (its id: ``pid`` itself for the main thread)."""
    path = f"/proc/{pid}/stat" if thread is None else f"/proc/{pid}/task/{thread}/stat"
    fields = Path(path).read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


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


def scrape_metrics(log_text: str, everything: bool = False) -> dict[str, float]:
    """A worker's Prometheus metrics (its address from the worker's log, the
    ``metrics on http://…/metrics`` line), as ``name{labels}`` -> value; {} when
    the worker has none or does not answer. Only the ``efficacy_`` series unless
    ``everything``."""
    import urllib.request

    match = re.search(r"metrics on (http://\S+/metrics)", log_text)
    if not match:
        return {}
    try:
        with urllib.request.urlopen(match.group(1), timeout=5) as response:
            text = response.read().decode()
    except OSError:
        return {}
    out = {}
    for line in text.splitlines():
        if line.startswith("#") or " " not in line:
            continue
        if everything or line.startswith("efficacy_"):
            name, value = line.rsplit(" ", 1)
            with contextlib.suppress(ValueError):
                out[name] = float(value)
    return out


def loop_lag(metrics: dict[str, float], since: dict[str, float] | None = None) -> dict:
    """The event-loop lag the worker measured (``efficacy_event_loop_lag_seconds``,
    streams.loop_lag: one observation per 0.25 s sleep), from a scrape, or the
    difference of two scrapes (``since`` the earlier one). The histogram bounds the
    maximum: it lies in (``max_above_s``, ``max_at_most_s``]."""
    name = "efficacy_event_loop_lag_seconds"
    since = since or {}

    def delta(key: str) -> float:
        return metrics.get(key, 0.0) - since.get(key, 0.0)

    count = delta(f"{name}_count")
    buckets = []
    for key in metrics:
        found = re.fullmatch(rf'{name}_bucket\{{le="([^"]+)"\}}', key)
        if found:
            buckets.append((float(found.group(1)), delta(key)))
    buckets.sort()
    above, at_most = 0.0, None
    for bound, cumulative in buckets:
        if cumulative >= count:
            at_most = bound
            break
        above = bound
    return {
        "observations": count,
        "mean_s": delta(f"{name}_sum") / count if count else None,
        "max_above_s": above if count else None,
        "max_at_most_s": at_most,
        "over_1s": count - dict(buckets).get(1.0, count) if buckets else None,
    }


#: faust's own record of a blocked loop: a timer that woke up late.
TIMER_DRIFT = re.compile(r"Timer (\S+) woke up too late, with a drift of \+([\d.]+)")


def timer_drift_max(log_text: str) -> float:
    """The largest drift faust logged for any of its timers (s; 0 if none)."""
    return max((float(m.group(2)) for m in TIMER_DRIFT.finditer(log_text)), default=0.0)
