"""How late the worker's event loop runs: the lag every agent, heartbeat and
offset commit waits behind blocking work on the loop.

A task (started once the worker has recovered its tables, as faust starts app
tasks) sleeps ``interval`` seconds at a time and records by how much each sleep
overran (Telemetry.loop_lag: the ``efficacy_event_loop_lag_seconds``
histogram). A population book rebuilt on the loop, a long synchronous batch or
a garbage collection shows here; a lag over a second or so delays the consumer's
heartbeats and the group may rebalance.
"""

from __future__ import annotations

import asyncio

import faust

from streams.telemetry import Telemetry

INTERVAL_SECONDS = 0.25


def install(app: faust.App, telemetry: Telemetry, interval: float = INTERVAL_SECONDS) -> None:
    """Measure the loop's lag for as long as the worker runs."""

    async def measure() -> None:
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            await asyncio.sleep(interval)
            telemetry.loop_lag(loop.time() - started - interval)

    app.task(measure)
