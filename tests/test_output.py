"""streams.output.delivered: a batch's records count as written only when every
delivery succeeded (pure asyncio futures, no broker)."""

from __future__ import annotations

import asyncio

import pytest

from streams.output import DeliveryFailed, delivered


def test_every_delivery_must_succeed():
    async def scenario(fail: bool) -> None:
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in range(3)]
        futures[0].set_result("metadata")
        if fail:
            futures[1].set_exception(TimeoutError("request timed out"))
        else:
            futures[1].set_result("metadata")
        loop.call_later(0.01, futures[2].set_result, "metadata")  # completes later
        await delivered(futures)

    asyncio.run(scenario(fail=False))
    with pytest.raises(DeliveryFailed, match=r"1 of 3 records not delivered.*timed out"):
        asyncio.run(scenario(fail=True))
    asyncio.run(delivered([]))
