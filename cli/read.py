"""``efficacy scores`` and ``efficacy alerts``: read what the pipeline publishes.

Both read their topic from the beginning with the deployment's settings (broker,
topic prefix, TLS/SASL: streams.settings), keep the latest record per key, apply
the filters and print a table or JSON lines; ``--follow`` then keeps printing
every new record that passes the filters until interrupted (or ``--seconds``).
The ``scores`` topic is compacted, so a snapshot reads the current score of
every patient without replaying history.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Callable, Iterable

from aiokafka import AIOKafkaConsumer, TopicPartition

from cli.kafka_io import all_partitions
from streams.kafka_options import aiokafka_options, start_client
from streams.settings import Settings

CALLS = ("responder", "non_responder", "uncertain", "insufficient_data")
ALERT_KINDS = ("transition", "drift", "prior_data_conflict")


def scores_parser(parser: argparse.ArgumentParser) -> None:
    _common(parser)
    parser.add_argument("--patient", action="append", help="only this patient (repeatable)")
    parser.add_argument("--call", choices=CALLS, action="append", help="only these calls")
    parser.add_argument("--cohort", action="append", help="only this cohort (repeatable)")
    parser.add_argument("--measure", help="only this measure's scores")


def alerts_parser(parser: argparse.ArgumentParser) -> None:
    _common(parser)
    parser.add_argument("--kind", choices=ALERT_KINDS, action="append", help="only these kinds")
    parser.add_argument("--measure", help="only this measure's alerts")
    parser.add_argument("--patient", action="append", help="only this patient (repeatable)")


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--format", choices=("table", "jsonl"), default="table", help="how to print each record"
    )
    parser.add_argument("--follow", action="store_true", help="keep printing new records")
    parser.add_argument(
        "--seconds", type=float, default=None, help="with --follow: stop after this long"
    )


def run_scores(args: argparse.Namespace) -> int:
    settings = Settings()
    keep = score_filter(args.patient, args.call, args.cohort, args.measure)

    def shown(score: dict) -> dict:
        if args.measure:  # only the asked measure's part of the score
            score = dict(
                score, measures=[m for m in score["measures"] if m["measure"] == args.measure]
            )
        return score

    return asyncio.run(
        _read(settings.topic("scores"), settings, args, keep, shown, score_rows, SCORE_HEADER, True)
    )


def run_alerts(args: argparse.Namespace) -> int:
    settings = Settings()
    keep = alert_filter(args.kind, args.measure, args.patient)
    topic = settings.topic("alerts")
    return asyncio.run(
        _read(topic, settings, args, keep, lambda a: a, alert_rows, ALERT_HEADER, False)
    )


def score_filter(
    patients: list[str] | None,
    calls: list[str] | None,
    cohorts: list[str] | None,
    measure: str | None,
) -> Callable[[dict], bool]:
    """Whether an EfficacyScore passes the filters (a call or measure filter
    keeps a score when one of its measures matches)."""

    def keep(score: dict) -> bool:
        if patients and score["patient_id"] not in patients:
            return False
        if cohorts and score["cohort"] not in cohorts:
            return False
        measures = [m for m in score["measures"] if not measure or m["measure"] == measure]
        if not measures:
            return False
        return not calls or any(m["classification"] in calls for m in measures)

    return keep


def alert_filter(
    kinds: list[str] | None, measure: str | None, patients: list[str] | None
) -> Callable[[dict], bool]:
    def keep(alert: dict) -> bool:
        if kinds and alert["kind"] not in kinds:
            return False
        if measure and alert["measure"] != measure:
            return False
        return not patients or alert.get("patient_id") in patients

    return keep


SCORE_HEADER = ("patient", "cohort", "measure", "call", "effect", "90% interval",
                "P(>=MCID)", "readings", "posterior", "action")  # fmt: skip
ALERT_HEADER = ("time", "kind", "severity", "measure", "patient", "message")


def score_rows(score: dict) -> Iterable[tuple[str, ...]]:
    for m in score["measures"]:
        effect = m["effect"]
        yield (
            score["patient_id"],
            score["cohort"],
            m["measure"],
            m["classification"],
            f"{effect['mean']:+.3g} {m['unit']}",
            f"[{effect['lower']:+.3g}, {effect['upper']:+.3g}]",
            f"{m['p_benefit_ge_mcid']:.2f}",
            str(m["count_exposed"] + m["count_unexposed"]),
            f"v{m['population_version']}",
            m.get("recommended_action") or "",
        )


def alert_rows(alert: dict) -> Iterable[tuple[str, ...]]:
    yield (
        alert["event_time"][:19],
        alert["kind"],
        alert["severity"],
        alert["measure"],
        alert.get("patient_id") or "",
        alert["message"],
    )


def table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(str(c)) for c in column) for column in zip(header, *rows, strict=True)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(line.rstrip() for line in lines)


async def _read(
    topic: str,
    settings: Settings,
    args: argparse.Namespace,
    keep: Callable[[dict], bool],
    shown: Callable[[dict], dict],
    rows: Callable[[dict], Iterable[tuple[str, ...]]],
    header: tuple[str, ...],
    latest_only: bool,
) -> int:
    """Snapshot (to the end offsets as of the start; the latest record per key
    when ``latest_only``, else every record), then with ``--follow`` every new
    record; filtered, as a table or JSON lines."""
    consumer = AIOKafkaConsumer(
        **aiokafka_options(settings), enable_auto_commit=False, metadata_max_age_ms=500
    )
    await start_client(consumer, settings)
    try:
        try:
            tps = await all_partitions(consumer, [topic], timeout=10.0)
        except TimeoutError:
            print(f"no topic {topic} on {settings.bootstrap_servers}", file=sys.stderr)
            return 1
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        end = await consumer.end_offsets(tps)
        read: list[tuple[bytes | None, dict]] = []
        while [tp for tp in tps if await consumer.position(tp) < end[tp]]:
            batches = await consumer.getmany(timeout_ms=1000)
            for records in batches.values():
                for record in records:
                    if record.offset < end[TopicPartition(record.topic, record.partition)]:
                        read.append((record.key, json.loads(record.value)))
        values = list(dict(read).values()) if latest_only else [v for _, v in read]
        snapshot = [shown(v) for v in values if keep(v)]
        if args.format == "jsonl":
            for value in snapshot:
                print(json.dumps(value))
        else:
            print(table(header, [row for value in snapshot for row in rows(value)]))
        sys.stdout.flush()
        if not args.follow:
            return 0
        deadline = None if args.seconds is None else time.monotonic() + args.seconds
        while deadline is None or time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=500)
            for records in batches.values():
                for record in records:
                    value = json.loads(record.value)
                    if not keep(value):
                        continue
                    value = shown(value)
                    if args.format == "jsonl":
                        print(json.dumps(value), flush=True)
                    else:
                        for row in rows(value):
                            print("  ".join(row), flush=True)
        return 0
    finally:
        await consumer.stop()
