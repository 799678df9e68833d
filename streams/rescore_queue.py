"""When a worker rescores its patients after a new population posterior.

A new posterior of a measure (or joint group) asks every worker to score all its
patients with evidence of it again and republish the scores that moved
(streams.patient_step.rescore). A pass costs about 0.3-0.5 ms of event loop a
patient, so at 100k patients it is tens of seconds, and the population agent
publishes a new version every few seconds while evidence arrives. Rescoring
each version as it came made a backfill spend most of its time rescoring
patients whose next readings were about to be scored anyway.

``RescoreQueue`` holds at most one request per measure or joint group: versions
that arrive before its pass starts merge into it (``force`` if any of them asked
for every score), and the pass scores each chunk under the newest posterior the
worker holds then. While the patients agent has a backlog (``RawBacklog``: more
raw records waiting than a batch), a request waits, for at most ``max_delay``
seconds after it was made, or ``(1 - share) / share`` times its key's last
pass if that is longer (so passes take at most ``share`` of a backlogged
worker's time): every patient the backlog touches is scored under the newest
posterior anyway, and a worker that never catches up still republishes what a
new posterior moved. Without a backlog a request is due at once.

Both classes are pure bookkeeping (times and offsets in, decisions out); the
patients agent (streams/agents/patients.py) runs the passes.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass


@dataclass
class RescoreRequest:
    """Rescore every patient with evidence of ``key`` (a measure, or a joint
    group when ``joint``); ``force``: republish every score, not only those
    that moved materially; ``since``: when the oldest merged version arrived."""

    key: str
    joint: bool
    force: bool
    since: float

    @property
    def name(self) -> str:
        return f"joint {self.key}" if self.joint else self.key


def paced_wait(last_seconds: float, share: float) -> float:
    """How long to wait after a piece of work of ``last_seconds`` so that such
    work takes at most ``share`` of the time: ``last_seconds (1 - share) / share``
    (the rule both rescoring passes and population fits follow under a backlog)."""
    return last_seconds * (1.0 - share) / share


class RescoreQueue:
    """Pending rescoring requests, one per (key, joint), oldest first."""

    def __init__(self, max_delay: float, share: float = 0.2) -> None:
        self.max_delay = max_delay
        self.share = share
        self._pending: dict[tuple[str, bool], RescoreRequest] = {}
        self._last_pass: dict[tuple[str, bool], float] = {}  # seconds of the latest pass

    def __len__(self) -> int:
        return len(self._pending)

    def request(self, key: str, *, joint: bool, force: bool, now: float) -> None:
        """A new posterior of ``key`` arrived at ``now``: merge it into the
        pending request (keeping its age) or queue a new one."""
        pending = self._pending.get((key, joint))
        if pending is None:
            self._pending[(key, joint)] = RescoreRequest(key, joint, force, now)
        else:
            pending.force = pending.force or force

    def deadline(self, request: RescoreRequest) -> float:
        """Until when ``request`` may wait for a backlog to clear."""
        last_pass = self._last_pass.get((request.key, request.joint), 0.0)
        return request.since + max(self.max_delay, paced_wait(last_pass, self.share))

    def done(self, request: RescoreRequest, seconds: float) -> None:
        """``request``'s pass took ``seconds`` (paces the next one under a backlog)."""
        self._last_pass[(request.key, request.joint)] = seconds

    def take_due(self, now: float, backlogged: bool) -> RescoreRequest | None:
        """The oldest request, removed, if it is due: at once without a backlog,
        else once it has waited ``max_delay``. None when nothing is due."""
        if not self._pending:
            return None
        oldest = min(self._pending.values(), key=lambda r: r.since)
        if backlogged and now < self.deadline(oldest):
            return None
        return self._pending.pop((oldest.key, oldest.joint))


class RawBacklog:
    """Records waiting for the patients agent: those it has taken from the
    stream and not yet applied (``in_hand``: a take holds every chunk faust has
    buffered, thousands of records in a backfill), and those still in Kafka,
    from what each take saw: per partition, the log end offset (the consumer's
    highwater) less the offset after the last record taken. A partition's
    count is forgotten after ``stale_after`` seconds without a take from it
    (revoked, or drained while other partitions kept the agent busy: no take
    from it means nothing was waiting there)."""

    def __init__(self, threshold: int, stale_after: float = 5.0) -> None:
        self.threshold = threshold
        self.stale_after = stale_after
        self.in_hand = 0
        self._waiting: dict[Hashable, tuple[int, float]] = {}  # partition -> (records, when)

    def observe(self, partition: Hashable, next_offset: int, end_offset: int | None, now: float):
        """A batch took records of ``partition`` up to ``next_offset`` (the last
        one's offset + 1) when its end offset was ``end_offset`` (None: unknown)."""
        waiting = 0 if end_offset is None else max(end_offset - next_offset, 0)
        self._waiting[partition] = (waiting, now)

    def records(self, now: float) -> int:
        """Records in hand, and in Kafka summed over the partitions seen in the
        last ``stale_after`` s."""
        fresh = {p: v for p, v in self._waiting.items() if now - v[1] <= self.stale_after}
        self._waiting = fresh
        return self.in_hand + sum(count for count, _ in fresh.values())

    def backlogged(self, now: float) -> bool:
        """More than ``threshold`` records (a batch) are waiting."""
        return self.records(now) > self.threshold


class ChunkBudget:
    """How many patients the next rescoring chunk takes so that it holds the
    event loop for about ``target_seconds``.

    A chunk is loaded, scored and saved without an await (the ownership read
    it is saved under must stay true), so its length is event-loop lag. Its
    cost per patient varies several-fold: a record-cache miss parses the
    stored state, and the population fit's thread takes the GIL for part of
    the time. So the size follows the last chunk's measured cost per patient,
    ``count · target / seconds``, at most doubling per chunk and kept within
    [``smallest``, ``largest``]; the first chunk is ``first`` patients. The
    bound keeps a chunk of expensive patients after a run of cheap ones (cache
    hits, patients without the measure) to what a fixed chunk held before. The
    time measured leaves out the chunk's writes, whose synchronous part (the
    store's puts, the records' serialisation for the producer) comes after."""

    def __init__(
        self,
        target_seconds: float = 0.1,
        first: int = 64,
        smallest: int = 8,
        largest: int = 1024,
    ) -> None:
        self.target_seconds = target_seconds
        self.smallest = smallest
        self.largest = largest
        self.size = first

    def record(self, count: int, seconds: float) -> None:
        """A chunk of ``count`` patients held the loop for ``seconds``."""
        if count <= 0:
            return
        fitting = count * self.target_seconds / max(seconds, 1e-6)
        size = min(int(fitting), 2 * self.size)
        self.size = max(self.smallest, min(self.largest, size))
