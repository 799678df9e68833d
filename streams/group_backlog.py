"""Whether any worker of the consumer group is behind on the raw topics.

A worker knows its own backlog (streams.rescore_queue.RawBacklog). But one
worker fits a measure's population posterior for the whole group, and every
posterior makes every worker rescore its patients: so the owner's fits are
paced (streams.fit_pace) while *any* worker of the group has a backlog. Paced
by its own backlog only, an owner that has caught up would fit every interval
while its peer still replays, and both would rescore after every fit.

The group's progress is in Kafka: each raw partition's committed offset (the
group's) and its log end offset. A committed offset trails its worker's
position by up to a commit interval and a step, so a lag counted in records
says nothing without a rate. ``GroupBacklog`` asks in time instead: a partition
is *behind* when its committed offset has not reached the end offset the
partition had ``horizon`` seconds ago, i.e. records older than the horizon
still wait. A live worker commits its records within a commit interval plus a
step's latency (seconds, under the horizon); a replay or a worker that cannot
keep up does not. Pure bookkeeping: offsets and times in, decisions out
(``streams.group_offsets.watch`` polls Kafka).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable, Mapping


class GroupBacklog:
    """The group's committed offsets and the raw partitions' end offsets over
    the last ``horizon`` seconds; ``stale_after``: samples older than this (the
    poll failing) mean *unknown*, answered as not behind (fits unpaced, as
    without this signal)."""

    def __init__(self, horizon: float = 10.0, stale_after: float = 30.0) -> None:
        if horizon <= 0:
            raise ValueError(f"horizon must be positive, not {horizon}")
        self.horizon = horizon
        self.stale_after = stale_after
        self._ends: deque[tuple[float, dict[Hashable, int]]] = deque()
        self._committed: dict[Hashable, int] = {}
        self._observed_at: float | None = None

    def observe(
        self, now: float, ends: Mapping[Hashable, int], committed: Mapping[Hashable, int]
    ) -> None:
        """At ``now`` the partitions' end offsets were ``ends`` and the group's
        committed offsets ``committed`` (a partition without a commit: its log
        start offset, where the group would begin)."""
        self._ends.append((now, dict(ends)))
        # keep one sample at or before now - horizon: the one behind() compares with
        while len(self._ends) > 1 and self._ends[1][0] <= now - self.horizon:
            self._ends.popleft()
        self._committed = dict(committed)
        self._observed_at = now

    def behind(self, now: float) -> dict[Hashable, int]:
        """Per partition behind, the records it has not committed of those
        that were in it ``horizon`` seconds ago (none: no sample that old yet,
        or the latest is stale)."""
        if self._observed_at is None or now - self._observed_at > self.stale_after:
            return {}
        taken, ends = self._ends[0]
        if taken > now - self.horizon:
            return {}
        waiting = {tp: end - self._committed.get(tp, 0) for tp, end in ends.items()}
        return {tp: count for tp, count in waiting.items() if count > 0}

    def backlogged(self, now: float) -> bool:
        """Some raw partition still holds records older than the horizon."""
        return bool(self.behind(now))

    def lag(self) -> int:
        """Records in the raw topics not yet committed by the group, at the
        latest sample (the consumer group's lag)."""
        if not self._ends:
            return 0
        _, ends = self._ends[-1]
        return sum(max(end - self._committed.get(tp, 0), 0) for tp, end in ends.items())
