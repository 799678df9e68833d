"""How fast a bare faust agent can read records: the ceiling of any faust worker.

    python -m benchmarks.faust_ceiling --bootstrap HOST:PORT --topics T1,T2 --expect N

A faust app with one agent on ``--topics`` reads them from the beginning with
``take_events`` (the patients agent's batching) and does nothing with each
record but ``json.loads``. It prints one JSON line (faust's worker routes it to
its log, on stderr), ``{"events": n, "seconds": s, "events_per_s": r,
"cpu_seconds": c}``, timed from the first batch to the
``--expect``-th record, and exits. ``benchmarks.throughput`` runs it in a
subprocess on the raw topics of its own run, next to the plain aiokafka
ceiling, so the pipeline's rate can be read against both in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--topics", required=True, help="comma-separated topic names")
    parser.add_argument("--expect", type=int, required=True, help="records to read")
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--batch-seconds", type=float, default=0.1)
    parser.add_argument(
        "--chunked",
        action="store_true",
        help="one event per fetched partition chunk (streams.chunked_consumer)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from streams.chunked_consumer import ChunkedApp

    args = parse_args(argv)
    tag = uuid.uuid4().hex[:8]
    topics = args.topics.split(",")
    app = ChunkedApp(
        f"faust-ceiling-{tag}",
        broker=f"kafka://{args.bootstrap}",
        store="memory://",
        web_enabled=False,
        key_serializer="raw",
        value_serializer="raw",
        topic_partitions=args.partitions,
        consumer_max_fetch_size=16 * 1024 * 1024,
        consumer_auto_offset_reset="earliest",
        datadir=f"/tmp/faust-ceiling-{tag}",
        chunked_topics=topics if args.chunked else (),
    )
    topic = app.topic(*topics)
    state = {"events": 0, "started": None, "cpu": None}

    @app.agent(topic)
    async def read(stream):
        async for events in stream.take_events(args.batch_size, within=args.batch_seconds):
            if state["started"] is None:
                state["started"], state["cpu"] = time.perf_counter(), time.process_time()
            for event in events:
                if args.chunked:
                    for value in event.value.values:
                        json.loads(value)
                    state["events"] += len(event.value)
                else:
                    json.loads(event.value)
                    state["events"] += 1
            if state["events"] >= args.expect:
                seconds = time.perf_counter() - state["started"]
                result = {
                    "events": state["events"],
                    "seconds": seconds,
                    "events_per_s": state["events"] / seconds,
                    "cpu_seconds": time.process_time() - state["cpu"],
                }
                print(json.dumps(result), flush=True)
                os._exit(0)  # a measurement, not a service: no clean shutdown to wait for

    sys.argv = [sys.argv[0], "worker", "--loglevel", "warn"]
    app.main()
    return 1


if __name__ == "__main__":
    sys.exit(main())
