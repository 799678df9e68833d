"""A faust worker for tests/test_chunked_consumer.py (run as a subprocess).

    python tests/chunk_reader_app.py BOOTSTRAP APP_ID TOPIC OFFSETS_FILE [HOLD_AFTER]

One agent on TOPIC with streams.chunked_consumer delivering by chunk. Every
chunk's (partition, offsets) is appended to OFFSETS_FILE as a JSON line once
the agent has handled it. With HOLD_AFTER, the agent stops at the first chunk
that would take it past HOLD_AFTER records, writes that chunk's line with
``"held": true`` and never returns from it (the chunk is never acked).
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from streams.chunked_consumer import ChunkedApp


def read_chunks(path: Path) -> list[dict]:
    """The chunk lines written so far to ``path`` (a line still being written is
    left out)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def reader_app(bootstrap: str, app_id: str, topic_name: str, **settings: Any) -> ChunkedApp:
    """A ChunkedApp of group ``app_id`` that reads ``topic_name`` by chunk as raw
    bytes from its earliest offset, keeps tables in memory and commits every
    0.5 s; ``settings`` adds faust settings or overrides these."""
    return ChunkedApp(
        app_id,
        **{
            "broker": f"kafka://{bootstrap}",
            "store": "memory://",
            "web_enabled": False,
            "key_serializer": "raw",
            "value_serializer": "raw",
            "consumer_auto_offset_reset": "earliest",
            "broker_commit_interval": 0.5,
            "broker_heartbeat_interval": 1.0,
            "datadir": f"/tmp/{app_id}",
            "chunked_topics": [topic_name],
            **settings,
        },
    )


def run_worker(app: ChunkedApp, loglevel: str) -> None:
    """Run ``app`` as faust's worker command (no web server), until it is stopped."""
    sys.argv = [sys.argv[0], "worker", "--without-web", "--loglevel", loglevel]
    app.main()


def main() -> None:
    bootstrap, app_id, topic_name, offsets_file = sys.argv[1:5]
    hold_after = int(sys.argv[5]) if len(sys.argv) > 5 else None
    app = reader_app(
        bootstrap,
        app_id,
        topic_name,
        consumer_max_fetch_size=8 * 1024,  # small chunks: many per partition
        broker_session_timeout=6.0,  # a killed reader leaves the group quickly
    )
    topic = app.topic(topic_name)
    seen = 0

    @app.agent(topic)
    async def read(stream):
        nonlocal seen
        async for chunk in stream:
            line = {"partition": chunk.partition, "offsets": chunk.offsets, "values": chunk.values}
            if hold_after is not None and seen + len(chunk) > hold_after:
                line["held"] = True
                with open(offsets_file, "a") as out:
                    out.write(json.dumps(line, default=bytes.decode) + "\n")
                await asyncio.Event().wait()  # never acked
            seen += len(chunk)
            with open(offsets_file, "a") as out:
                out.write(json.dumps(line, default=bytes.decode) + "\n")

    run_worker(app, "warn")


if __name__ == "__main__":
    main()
