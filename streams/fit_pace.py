"""How often the population agent fits a measure while the worker has a backlog.

The agent considers an update of every owned measure with new evidence each
``EFFICACY_POPULATION_INTERVAL_SECONDS``. A fit at 100k patients takes seconds,
so unpaced, a backfill's fits run back to back, each competing with the
patients agent for the cores and each publishing a posterior that asks every
worker to rescore (benchmarks/README.md §6, the 1M-reading backfill). The
backlog's patients are scored under whatever posterior is newest when their
readings are applied, and a posterior of 100k patients hardly moves in a few
seconds of readings.

``FitPace``: while the patients agent has a backlog (``RawBacklog``), a
measure's (or joint group's) next fit starts no sooner than ``(1 - share) /
share`` times its last fit's duration after that fit ended, so fits take at
most ``share`` of a backlogged worker's time; the wait is capped at
``max_wait`` seconds, so a fit slowed by a one-off compilation does not hold
the next one back for minutes. Without a backlog, and for a key's first fit
on this worker (a start, a takeover), a fit is due at once. Pure bookkeeping:
times in, decisions out.
"""

from __future__ import annotations

from streams.rescore_queue import paced_wait


class FitPace:
    """The last fit of each measure or joint group, and whether the next is due."""

    def __init__(self, share: float, max_wait: float = 60.0) -> None:
        if not 0.0 < share <= 1.0:
            raise ValueError(f"share must be in (0, 1], not {share}")
        self.share = share
        self.max_wait = max_wait
        self._last: dict[str, tuple[float, float]] = {}  # key -> (ended, seconds)

    def done(self, key: str, started: float, ended: float) -> None:
        """``key``'s fit ran from ``started`` to ``ended`` (monotonic seconds)."""
        self._last[key] = (ended, ended - started)

    def next_due(self, key: str) -> float:
        """When ``key``'s next fit is due under a backlog (-inf: no fit yet)."""
        last = self._last.get(key)
        if last is None:
            return float("-inf")
        ended, seconds = last
        return ended + min(paced_wait(seconds, self.share), self.max_wait)

    def due(self, key: str, now: float, backlogged: bool) -> bool:
        """Whether ``key`` may be fitted at ``now``."""
        return not backlogged or now >= self.next_due(key)

    def forget(self, key: str) -> None:
        """``key`` moved to another worker: its next fit here is a first one."""
        self._last.pop(key, None)
