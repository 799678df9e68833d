"""The classification gauge's counts, kept call by call (streams.telemetry.CallTally),
equal a recount of every patient's latest call after any sequence of updates."""

from __future__ import annotations

import random
from collections import Counter

from streams.telemetry import CallTally

CALLS = ("responder", "non_responder", "uncertain")


def test_counts_equal_a_recount_of_the_latest_calls_and_a_vanished_call_reads_zero() -> None:
    rng = random.Random(11)
    tally = CallTally()
    latest: dict[str, str] = {}
    for _ in range(300):  # batches of calls, patients recurring, calls changing or not
        calls = {f"p{rng.randrange(200)}": rng.choice(CALLS) for _ in range(rng.randint(1, 40))}
        tally.update(calls)
        latest.update(calls)
        recount = Counter(latest.values())
        assert {c: n for c, n in tally.counts.items() if n} == recount
        assert all(n >= 0 for n in tally.counts.values())
    tally.update(dict.fromkeys(latest, "uncertain"))  # everyone moves to one call
    assert tally.counts == Counter({"uncertain": len(latest), "responder": 0, "non_responder": 0})
