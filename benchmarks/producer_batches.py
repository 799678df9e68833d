"""What handing records to the producer costs: one ``send`` per record against
``Producer.send_many`` (one batch per partition, aiokafka's ``send_batch``).

    python -m benchmarks.producer_batches            # -> results/producer_batches.json

Each repeat sends ``--records`` records of ``--value-bytes`` (a patient's
changelog record is 3-9 kB) over ``--partitions`` partitions of a fresh topic,
two thirds keyed (the producer's partitioner) and a third with their partition
given, as the worker's steps do, through an aiokafka producer configured as the
worker's (acks=all, 1 MiB batches, linger 5 ms), and waits until every record is
written. Measured per record: this process's CPU (the producer's sender runs on
the same event loop, so its work is counted too) and the wall time. The two ways
alternate, and the medians over ``--repeats`` are reported with their ratio.

Uses the broker named by ``KAFKA_BOOTSTRAP_SERVERS`` or starts a local one.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
import uuid
from types import SimpleNamespace

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from benchmarks.common import machine, median, say, write_json
from streams.app import PRODUCER_BATCH_BYTES
from streams.output import Producer, delivered


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=20_000)
    parser.add_argument("--value-bytes", type=int, default=3_000)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=7)
    return parser.parse_args(argv)


async def one_repeat(bootstrap: str, args: argparse.Namespace, batched: bool) -> dict:
    topic = f"producer-batches-{uuid.uuid4().hex[:8]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, args.partitions, 1)])
    finally:
        await admin.close()
    value = b"x" * args.value_bytes
    records = [
        (topic, f"patient-{i}".encode(), value, None if i % 3 else i % args.partitions)
        for i in range(args.records)
    ]
    aio = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", max_batch_size=PRODUCER_BATCH_BYTES, linger_ms=5
    )
    await aio.start()
    try:
        await aio.client._wait_on_metadata(topic)
        producer = Producer(SimpleNamespace(producer=SimpleNamespace(_ensure_producer=lambda: aio)))
        wall, cpu = time.perf_counter(), time.process_time()
        if batched:
            futures = [batch.future for batch in await producer.send_many(records)]
        else:
            futures = [await aio.send(topic, value=v, key=k, partition=p) for _, k, v, p in records]
        await delivered(futures)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    finally:
        await aio.stop()
    return {"cpu_us_per_record": 1e6 * cpu / len(records), "wall_s": wall}


def run(bootstrap: str, args: argparse.Namespace) -> dict:
    results: dict[str, list[dict]] = {"send": [], "send_many": []}
    for repeat in range(args.repeats):
        for name in ("send", "send_many"):
            result = asyncio.run(one_repeat(bootstrap, args, batched=name == "send_many"))
            results[name].append(result)
            say(f"repeat {repeat}: {name} {result['cpu_us_per_record']:.1f} µs CPU a record, "
                f"{result['wall_s']:.2f} s")  # fmt: skip
    summary = {
        name: {
            "cpu_us_per_record": median([r["cpu_us_per_record"] for r in runs]),
            "records_per_s": args.records / median([r["wall_s"] for r in runs]),
        }
        for name, runs in results.items()
    }
    summary["cpu_ratio_send_many_to_send"] = (
        summary["send_many"]["cpu_us_per_record"] / summary["send"]["cpu_us_per_record"]
    )
    return {"summary": summary, "repeats": results, "parameters": vars(args)}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    kafka = None
    if not bootstrap:
        from cli.broker import LocalKafka

        kafka = LocalKafka(log=say)
        bootstrap = kafka.start()
    try:
        result = run(bootstrap, args)
    finally:
        if kafka is not None:
            kafka.stop()
    result["machine"] = machine()
    say(f"summary: {result['summary']}")
    say(f"wrote {write_json('producer_batches', result)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
