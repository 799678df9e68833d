"""``efficacy worker`` under cProfile on CPU time, switched by signals.

    EFFICACY_PROFILE_OUT=/tmp/worker.prof python -m benchmarks.profiled_worker

Signal SIGRTMIN+1 starts profiling, SIGRTMIN+2 stops it and writes the pstats
file (mode's worker owns SIGUSR1/2). benchmarks/throughput.py uses this with
``--cprofile-worker`` to profile the throughput phase only. The profiler's timer
is the process's CPU time, so time spent waiting for a CPU on a shared machine is
not attributed to whatever line was running; cProfile's own overhead slows the
worker, so profiled runs are not used for the headline rates.
"""

from __future__ import annotations

import cProfile
import os
import signal
import sys
import time


def main() -> int:
    out = os.environ["EFFICACY_PROFILE_OUT"]
    profiler = cProfile.Profile(time.process_time)

    def start(*_: object) -> None:
        profiler.enable()

    def stop(*_: object) -> None:
        profiler.disable()
        profiler.dump_stats(out)

    signal.signal(signal.SIGRTMIN + 1, start)
    signal.signal(signal.SIGRTMIN + 2, stop)
    from cli.main import main as cli

    return cli(["worker", "--loglevel", os.environ.get("EFFICACY_PROFILE_LOGLEVEL", "info")])


if __name__ == "__main__":
    sys.exit(main())
