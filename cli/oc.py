"""``efficacy oc``: operating characteristics of the responder calls by simulation.

Simulates programmes under a chosen truth for a range of observations per
patient, fits each with the collapsed SVI, classifies with the decision rule and
writes the rates of correct and false calls (model.operating) as a markdown
table, JSON and a PNG plot.

``--subgroups``: the same for the subgroup calls instead. The truth has a
group (levels A = 0 and B = 1, equally likely) whose effect differs by
``--group-effect``; each level is a subgroup and its call is counted per
programme (oc_subgroups.md and oc_subgroups.json, no plot).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any


def _int_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected integers separated by commas, got {text!r}"
        ) from None
    if not values or min(values) < 2:
        raise argparse.ArgumentTypeError("observation counts must be integers >= 2")
    return values


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--obs", type=_int_list, default=[6, 10, 20, 40],
        help="observations per patient to evaluate, comma-separated",
    )  # fmt: skip
    parser.add_argument("--replicates", type=int, default=4, help="programmes per row")
    parser.add_argument("--patients", type=int, default=300, help="patients per programme")
    parser.add_argument("--cohorts", type=int, default=10, help="cohorts per programme")
    parser.add_argument(
        "--effect", type=float, default=None,
        help="true population effect per unit exposure, raw units (bpm for heart rate); "
        "default -4, or 0 (in group A) with --subgroups",
    )  # fmt: skip
    parser.add_argument(
        "--effect-sd", type=float, default=3.0, help="true between-patient sd of the effect"
    )
    parser.add_argument(
        "--cohort-effect-sd", type=float, default=1.0, help="true between-cohort sd of the effect"
    )
    parser.add_argument("--residual-sd", type=float, default=4.0, help="true residual sd")
    parser.add_argument("--intercept", type=float, default=70.0, help="true mean baseline")
    parser.add_argument(
        "--intercept-sd", type=float, default=6.0, help="true between-patient sd of the baseline"
    )
    parser.add_argument(
        "--baseline-fraction", type=float, default=0.5,
        help="fraction of follow-up before exposure starts",
    )  # fmt: skip
    parser.add_argument("--mcid", type=float, default=3.0, help="MCID, raw units")
    parser.add_argument(
        "--direction", choices=["higher", "lower"], default="lower",
        help="which direction of the outcome is a benefit",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="replicate r uses seed + r")
    parser.add_argument(
        "--out-dir", type=Path, default=Path("oc"),
        help="folder for oc.md, oc.json and oc.png",
    )  # fmt: skip
    parser.add_argument(
        "--svi-steps", type=int, default=None, help="SVI steps per fit (default: SVIConfig's)"
    )
    parser.add_argument(
        "--subgroups", action="store_true",
        help="operating characteristics of the subgroup calls (groups A and B) instead",
    )  # fmt: skip
    parser.add_argument(
        "--group-effect", type=float, default=None,
        help="with --subgroups: group B's effect minus group A's, raw units "
        "(default 2.5 MCID of benefit)",
    )  # fmt: skip


def run(args: argparse.Namespace) -> int:
    from model.config import DecisionRule, MeasureConfig, SVIConfig
    from model.operating import markdown_table, operating_characteristics
    from model.simulate import ProgrammeSpec

    def say(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    try:
        measure = MeasureConfig(name="outcome", unit="", direction=args.direction, mcid=args.mcid)
        subgroups = {}
        if args.subgroups:
            group_effect = args.group_effect
            if group_effect is None:
                group_effect = 2.5 * args.mcid * measure.benefit_sign
            subgroups = {"group_effects": (group_effect,), "with_covariates": True}
        elif args.group_effect is not None:
            raise ValueError("--group-effect needs --subgroups")
        effect = args.effect if args.effect is not None else (0.0 if args.subgroups else -4.0)
        spec = ProgrammeSpec(
            num_patients=args.patients,
            num_cohorts=args.cohorts,
            effect=effect,
            effect_sd=args.effect_sd,
            cohort_effect_sd=args.cohort_effect_sd,
            residual_sd=args.residual_sd,
            intercept=args.intercept,
            intercept_sd=args.intercept_sd,
            baseline_fraction=args.baseline_fraction,
            **subgroups,
        )
        svi = SVIConfig() if args.svi_steps is None else SVIConfig(fresh_steps=args.svi_steps)
    except ValueError as error:
        say(f"efficacy oc: error: {error}")
        return 2
    if args.replicates < 1:
        say("efficacy oc: error: --replicates must be at least 1")
        return 2
    started = time.perf_counter()
    say(
        f"operating characteristics{' of the subgroup calls' if args.subgroups else ''}: "
        f"{len(args.obs)} observation counts × {args.replicates} programmes of "
        f"{args.patients} patients"
    )
    if args.subgroups:
        return _run_subgroups(args, spec, measure, svi, started, say)
    result = operating_characteristics(
        spec,
        measure,
        args.obs,
        args.replicates,
        seed=args.seed,
        rule=DecisionRule(),
        svi_config=svi,
        progress=say,
    )
    result["seconds"] = round(time.perf_counter() - started, 1)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    table = markdown_table(result)
    (args.out_dir / "oc.md").write_text(table + "\n")
    (args.out_dir / "oc.json").write_text(json.dumps(result, indent=2) + "\n")
    try:
        plot(result, args.out_dir / "oc.png")
        written = "oc.png"
    except ImportError:  # matplotlib is the optional extra `plots`
        written = "no oc.png (pip install 'living-efficacy[plots]' for it)"
    print(table)
    say(f"wrote {args.out_dir / 'oc.md'}, oc.json, {written} in {result['seconds']} s")
    return 0


def _run_subgroups(args, spec, measure, svi, started: float, say) -> int:
    """``--subgroups``: the subgroup calls' rates (model.operating), table and JSON."""
    from model.config import DecisionRule
    from model.operating import subgroup_markdown_table, subgroup_operating_characteristics

    result = subgroup_operating_characteristics(
        spec,
        measure,
        args.obs,
        args.replicates,
        seed=args.seed,
        rule=DecisionRule(),
        svi_config=svi,
        progress=say,
    )
    result["seconds"] = round(time.perf_counter() - started, 1)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    table = subgroup_markdown_table(result)
    (args.out_dir / "oc_subgroups.md").write_text(table + "\n")
    (args.out_dir / "oc_subgroups.json").write_text(json.dumps(result, indent=2) + "\n")
    print(table)
    say(f"wrote {args.out_dir / 'oc_subgroups.md'}, oc_subgroups.json in {result['seconds']} s")
    return 0


def plot(result: dict[str, Any], path: Path) -> None:
    """PNG of the rates against observations per patient, with ±2 se bars
    (matplotlib: the optional extra ``plots``)."""
    import matplotlib
    import matplotlib.ticker
    import numpy as np

    from model.operating import RATE_LABELS

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    obs = [row["obs_per_patient"] for row in result["rows"]]
    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=120)
    for name, style in [
        ("responder_called_responder", "o-"),
        ("nonresponder_called_nonresponder", "s-"),
        ("false_nonresponder", "v--"),
        ("false_responder", "^--"),
        ("insufficient_data", "x:"),
    ]:
        rates = np.array([row[name]["rate"] for row in result["rows"]])
        ses = np.array([row[name]["se"] for row in result["rows"]])
        ax.errorbar(obs, rates, yerr=2 * ses, fmt=style, capsize=3, label=RATE_LABELS[name])
    truth, measure = result["truth"], result["measure"]
    ax.set_xscale("log")
    ax.set_xticks(obs)
    ax.set_xticklabels([str(o) for o in obs])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("observations per patient")
    ax.set_ylabel("rate")
    ax.set_title(
        f"Operating characteristics: effect {truth['effect']:g} ± {truth['effect_sd']:g} "
        f"(between patients), residual sd {truth['residual_sd']:g}, MCID {measure['mcid']:g}",
        fontsize=9,
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
