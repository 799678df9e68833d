"""A faust worker for tests/test_rebalance_recovery.py (run as a subprocess).

    python tests/rebalance_reader_app.py BOOTSTRAP APP_ID TOPIC OFFSETS_FILE [stock]

The worker's rebalance fixes (streams.consumer_seek.install) on a ChunkedApp
with a table (so recovery has standby partitions and resumes flow control
before the stream partitions), and one agent on TOPIC that appends every
chunk's (partition, offsets) to OFFSETS_FILE as a JSON line, then counts it in
the table.

Two conditions make the end of recovery observable:
- the seek of the stream partitions takes SEEK_DELAY_SECONDS longer (a slow
  broker answering committed-offset requests, as with many partitions);
- the agent's first chunk of each consumer generation takes
  FIRST_CHUNK_SECONDS (as a first batch after a rebalance does, loading state),
  so the chunks fetched meanwhile wait in its queue.

With ``stock``, faust's own end of recovery is put back (to show what the fix
changes: the test then fails).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys

from chunk_reader_app import reader_app, run_worker
from faust.tables.recovery import Recovery
from faust.transport.consumer import Consumer

from streams import consumer_seek

SEEK_DELAY_SECONDS = 4.0
FIRST_CHUNK_SECONDS = 6.0
PARTITIONS = 4

_STOCK = (Recovery._resume_streams, Recovery.on_recovery_completed)
_PERFORM_SEEK = Consumer.perform_seek


async def slow_perform_seek(self: Consumer) -> None:
    await _PERFORM_SEEK(self)
    await asyncio.sleep(SEEK_DELAY_SECONDS)


def main() -> None:
    bootstrap, app_id, topic_name, offsets_file = sys.argv[1:5]
    stock = sys.argv[5:] == ["stock"]
    consumer_seek.install()
    if stock:
        Recovery._resume_streams, Recovery.on_recovery_completed = _STOCK
    Consumer.perform_seek = slow_perform_seek
    app = reader_app(
        bootstrap,
        app_id,
        topic_name,
        consumer_max_fetch_size=1024,  # small chunks: several per partition and second
        broker_session_timeout=10.0,
        table_standby_replicas=1,
        topic_partitions=PARTITIONS,
        datadir=f"/tmp/{app_id}-{os.getpid()}",  # two readers of one group
    )
    topic = app.topic(topic_name)
    counts = app.Table("chunks", default=int, partitions=PARTITIONS)

    @app.agent(topic)
    async def read(stream):
        generation = None
        async for event in stream.events():
            chunk = event.value
            if event.message.generation_id != generation:
                generation = event.message.generation_id
                await asyncio.sleep(FIRST_CHUNK_SECONDS)
            line = {"partition": chunk.partition, "offsets": chunk.offsets}
            with open(offsets_file, "a") as out:
                out.write(json.dumps(line) + "\n")
            counts[f"partition-{chunk.partition}"] += len(chunk)

    run_worker(app, "info")


if __name__ == "__main__":
    main()
