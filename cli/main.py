"""The ``efficacy`` command: worker, demo, fit, simulate, schemas, scores, alerts, report, oc."""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import sys
from collections.abc import Callable
from pathlib import Path

# The model runs in float64 on CPU unless the user says otherwise; set before jax loads.
os.environ.setdefault("JAX_ENABLE_X64", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def _worker_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--loglevel", default="warning", help="debug, info, warning, error")


def _run_worker(args: argparse.Namespace) -> int:
    import faust
    from prometheus_client import CollectorRegistry

    from monitoring.faust_sensor import install_faust_sensor
    from monitoring.metrics import create_metrics, serve_metrics
    from streams.app import create_pipeline
    from streams.compilation_cache import enable_compilation_cache
    from streams.data_dir import DataDirInUse, claim
    from streams.settings import Settings
    from streams.topics import ensure_topics

    settings = Settings()
    try:  # held until the process ends: one worker per data directory
        lock = claim(settings.data_dir)
    except DataDirInUse as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 1
    enable_compilation_cache(settings.compilation_cache_dir)
    # faust creates only the last level of its data directory
    settings.faust_dir.mkdir(parents=True, exist_ok=True)
    created = asyncio.run(ensure_topics(settings))
    if created:
        print(f"created topics: {', '.join(created)}", file=sys.stderr, flush=True)
    registry = CollectorRegistry()
    pipeline = create_pipeline(settings, create_metrics(registry))
    app = pipeline.app
    install_faust_sensor(app, registry)
    if settings.metrics_enabled:
        server = serve_metrics(registry, settings.metrics_port, settings.metrics_addr)
        print(
            f"metrics on http://{settings.metrics_addr}:{server.server_port}/metrics",
            file=sys.stderr,
            flush=True,
        )
    worker = faust.Worker(app, loglevel=args.loglevel)
    tune_garbage_collector()
    worker.execute_from_commandline()  # returns on SIGTERM / SIGINT after a clean stop
    lock.close()
    return 0


def tune_garbage_collector() -> None:
    """Freeze what start-up allocated (JAX, faust, pydantic, the app) out of the
    cyclic collector's reach, and collect the young generation less often. The
    worker's heap is large and long-lived: with the defaults, collections take
    about a quarter of the patients agent's step (benchmarks/README.md, section 6).
    Reference counting still frees everything acyclic at once."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, 20, 20)


GC_YOUNG_THRESHOLD = 50_000  # allocations between young collections (CPython default: 700)


def _demo_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--seconds", type=float, default=300.0, help="stop after this long (seconds)"
    )
    parser.add_argument("--patients", type=int, default=200, help="patients to simulate")
    parser.add_argument("--cohorts", type=int, default=8, help="clinics to simulate")
    parser.add_argument("--rate", type=float, default=250.0, help="events per second")
    parser.add_argument("--truth", type=Path, help="also write the simulated ground truth here")


def _run_demo(args: argparse.Namespace) -> int:
    from cli.demo import run_demo

    return run_demo(
        seconds=args.seconds,
        patients=args.patients,
        cohorts=args.cohorts,
        rate=args.rate,
        truth_file=args.truth,
    )


def _fit_parser(parser: argparse.ArgumentParser) -> None:
    from cli.fit import configure_parser

    configure_parser(parser)


def _run_fit(args: argparse.Namespace) -> int:
    from cli.fit import run

    return run(args)


def _simulate_parser(parser: argparse.ArgumentParser) -> None:
    from cli.simulate import configure_parser

    configure_parser(parser)


def _run_simulate(args: argparse.Namespace) -> int:
    from cli.simulate import run

    return run(args)


def _oc_parser(parser: argparse.ArgumentParser) -> None:
    from cli.oc import configure_parser

    configure_parser(parser)


def _run_oc(args: argparse.Namespace) -> int:
    from cli.oc import run

    return run(args)


def _schemas_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, help="folder for the schema files")
    parser.epilog = (
        "Measure names and units come from the measure catalogue "
        "(EFFICACY_MEASURES_FILE, default streams/measures.toml). "
        "Example: efficacy schemas --out schemas/"
    )


def _run_schemas(args: argparse.Namespace) -> int:
    """Write ``<out>/<topic>.schema.json`` for every topic and list the files."""
    import json

    from streams.catalogue import Catalogue
    from streams.schemas import json_schemas
    from streams.settings import Settings

    args.out.mkdir(parents=True, exist_ok=True)
    catalogue = Catalogue.load(Settings().measures_file)
    for topic, schema in json_schemas(catalogue).items():
        path = args.out / f"{topic}.schema.json"
        path.write_text(json.dumps(schema, indent=2, sort_keys=True) + "\n")
        print(f"wrote {path}")
    return 0


COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[..., int]]] = {
    "worker": ("run a stream-processing worker", _worker_parser, _run_worker),
    "demo": ("local broker + worker + producer, with live output", _demo_parser, _run_demo),
    "fit": ("fit a CSV of observations offline and write JSON", _fit_parser, _run_fit),
    "simulate": (
        "publish a simulated programme to the source topics; write its ground truth",
        _simulate_parser,
        _run_simulate,
    ),
    "schemas": ("write the JSON Schema of every topic's values", _schemas_parser, _run_schemas),
    "scores": (
        "print the current score of every patient (filters; --follow for new ones)",
        lambda parser: _read_command().scores_parser(parser),
        lambda args: _read_command().run_scores(args),
    ),
    "alerts": (
        "print the alerts: responder transitions, drift, prior-data conflicts (--follow)",
        lambda parser: _read_command().alerts_parser(parser),
        lambda args: _read_command().run_alerts(args),
    ),
    "report": (
        "write a self-contained HTML report of an `efficacy fit` result or of the topics",
        lambda parser: _report_command().configure_parser(parser),
        lambda args: _report_command().run(args),
    ),
    "oc": (
        "operating characteristics of the responder calls by simulation (table, JSON, PNG)",
        _oc_parser,
        _run_oc,
    ),
}


def _read_command():
    from cli import read as read_command

    return read_command


def _report_command():
    from cli import report

    return report


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every option's default in its help (but not "None" or off), the epilog's
    examples as written."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default not in (None, False, argparse.SUPPRESS) and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


#: An example of each command, shown at the end of its --help (unless the
#: command writes its own).
EXAMPLES = {
    "worker": "Example:\n  EFFICACY_BOOTSTRAP_SERVERS=kafka:9092 efficacy worker --loglevel info",
    "demo": "Example:\n  efficacy demo --seconds 120 --patients 100",
    "fit": (
        "Examples:\n"
        "  efficacy fit --input tests/data/sleepstudy/sleepstudy.csv --patient Subject \\\n"
        "      --exposure Days --outcome Reaction --direction lower --mcid 5 --output fit.json\n"
        "  efficacy fit --input readings.csv --patient patient --exposure on_drug \\\n"
        "      --outcome value --measure resting_heart_rate   # MCID from the catalogue"
    ),
    "simulate": "Example:\n  efficacy simulate --patients 500 --truth truth.json",
    "scores": "Examples:\n  efficacy scores\n  efficacy scores --call non_responder --follow",
    "alerts": "Example:\n  efficacy alerts --follow",
    "oc": "Example:\n  efficacy oc --effect -3 --mcid 3 --obs 10,20 --out-dir oc/",
}


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("living-efficacy")
    except PackageNotFoundError:  # run from a checkout that was not installed
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="efficacy", description="Living Bayesian efficacy scores per patient."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    commands = parser.add_subparsers(dest="command", required=True)
    argv = sys.argv[1:] if argv is None else argv
    # Only the named command's options are set up when a command is named: the
    # others' imports (settings, the simulator) cost a fast ``efficacy fit`` ~0.3 s.
    chosen = argv[0] if argv and argv[0] in COMMANDS else None
    for name, (help_text, configure, run) in COMMANDS.items():
        sub = commands.add_parser(
            name, help=help_text, description=help_text, formatter_class=HelpFormatter
        )
        if chosen in (None, name):
            configure(sub)
            sub.epilog = sub.epilog or EXAMPLES.get(name)
        sub.set_defaults(run=run)
    args = parser.parse_args(argv)
    try:
        return int(args.run(args))
    except Exception as error:
        from streams.kafka_options import KafkaAccessError  # imported on failure only

        if not isinstance(error, KafkaAccessError):
            raise
        # the broker refused the credentials or certificate: say which setting, no traceback
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
