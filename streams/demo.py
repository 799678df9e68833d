"""``efficacy demo``: the README's main job.

Starts the local Apache Kafka broker unless one is configured, a worker, and a
producer of wearable readings (with a few malformed ones), then shows what the
worker publishes until ``seconds`` have passed, and stops everything cleanly.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
import uuid
from datetime import UTC, datetime

from streams.kafka_io import produce
from streams.settings import Settings
from streams.worker_process import WorkerProcess


def say(message: str) -> None:
    print(f"[demo] {message}", flush=True)


def _readings(count: int) -> list[tuple[bytes, bytes]]:
    now = datetime.now(UTC).isoformat()
    records = []
    for i in range(count):
        patient = f"demo-patient-{i % 5}"
        reading = {
            "event_id": f"demo-{uuid.uuid4().hex}",
            "event_time": now,
            "patient_id": patient,
            "measure": "resting_heart_rate",
            "value": 60.0 + i % 7,
            "unit": "bpm",
        }
        records.append((patient.encode(), json.dumps(reading).encode()))
    records.append((b"demo-patient-0", b'{"event_id": "broken"'))  # malformed on purpose
    return records


async def _watch(settings: Settings, seconds: float, expected: int) -> dict[str, int]:
    from aiokafka import AIOKafkaConsumer

    counts = {"observations": 0, "deadletter": 0}
    consumer = AIOKafkaConsumer(
        settings.topic("observations"),
        settings.topic("deadletter"),
        bootstrap_servers=settings.bootstrap_servers,
        auto_offset_reset="earliest",
        metadata_max_age_ms=1000,
    )
    await consumer.start()
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline and sum(counts.values()) < expected:
            batch = await consumer.getmany(timeout_ms=1000)
            for records in batch.values():
                for record in records:
                    kind = record.topic.removeprefix(settings.topic_prefix)
                    counts[kind] += 1
                    body = json.loads(record.value)
                    if kind == "observations":
                        say(
                            f"observation  {body['measure']} = {body['value']} {body['unit']} "
                            f"(event {body['event_id'][:13]}...)"
                        )
                    else:
                        say(f"dead letter  reason={body['reason']}: {body['detail']}")
    finally:
        await consumer.stop()
    return counts


def run_demo(seconds: float = 60.0) -> int:
    from streams.broker import LocalKafka

    configured = os.environ.get("EFFICACY_BOOTSTRAP_SERVERS") or os.environ.get(
        "KAFKA_BOOTSTRAP_SERVERS"
    )
    run_id = uuid.uuid4().hex[:6]
    with contextlib.ExitStack() as stack:
        if configured:
            bootstrap = configured
            say(f"using the configured Kafka broker at {bootstrap}")
        else:
            kafka = stack.enter_context(LocalKafka(log=say))
            bootstrap = kafka.bootstrap_servers
        env = {
            "EFFICACY_BOOTSTRAP_SERVERS": bootstrap,
            "EFFICACY_TOPIC_PREFIX": os.environ.get("EFFICACY_TOPIC_PREFIX", f"demo-{run_id}."),
            "EFFICACY_APP_ID": os.environ.get("EFFICACY_APP_ID", f"efficacy-demo-{run_id}"),
            "EFFICACY_WEB_ENABLED": "false",
        }
        settings = Settings(**{k.removeprefix("EFFICACY_").lower(): v for k, v in env.items()})
        worker = stack.enter_context(WorkerProcess(env))
        say(f"worker started (log: {worker.log_path})")
        records = _readings(10)
        asyncio.run(produce(bootstrap, settings.topic("wearables"), records))
        say(f"produced {len(records)} records to {settings.topic('wearables')}")
        counts = asyncio.run(_watch(settings, seconds, expected=len(records)))
        say(
            f"done: {counts['observations']} observations accepted, "
            f"{counts['deadletter']} dead-lettered"
        )
        if not worker.alive():
            say("the worker stopped unexpectedly:\n" + worker.log_tail())
            return 1
        say(
            "read the topics yourself while a broker runs, e.g.\n"
            f"  python -m streams.broker start   # then set KAFKA_BOOTSTRAP_SERVERS and run "
            f"`efficacy demo` again; topics are prefixed {settings.topic_prefix}"
        )
    return 0 if counts["observations"] == len(records) - 1 and counts["deadletter"] == 1 else 1
