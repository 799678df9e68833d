"""The ``efficacy`` command itself: its version, every subcommand's help (the
defaults and an example whose options exist), and the rule that ``efficacy fit``
needs an MCID it can justify."""

from __future__ import annotations

import argparse
import re
import tomllib
from importlib.metadata import version
from pathlib import Path

import pytest

from cli.fit import InputError, measure_of
from cli.main import COMMANDS, main

REPO = Path(__file__).resolve().parents[1]
SLEEPSTUDY = REPO / "tests" / "data" / "sleepstudy" / "sleepstudy.csv"


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        code = main(argv)
    except SystemExit as stop:  # argparse's --help and --version
        code = stop.code or 0
    out = capsys.readouterr()
    return code, out.out, out.err


def test_version_is_the_installed_distributions(capsys):
    code, out, _ = run(["--version"], capsys)
    assert code == 0
    assert out.strip() == f"efficacy {version('living-efficacy')}"


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_help_shows_its_defaults_and_an_example_that_parses(command, capsys):
    code, text, _ = run([command, "--help"], capsys)
    assert code == 0
    head, example_word, example = re.split(r"(?i)(examples?:)", text, maxsplit=1)
    assert example_word, f"efficacy {command} --help has no example"
    options = set(re.findall(r"(--[a-z][a-z0-9-]*)", head))
    # each example command line (with its continuation lines) of this command
    lines = re.sub(r"\\\n\s*", " ", example).splitlines()
    own = [line for line in lines if re.search(rf"(^|\s)efficacy {command}\b", line)]
    assert own, f"efficacy {command} --help has no example of itself"
    used = {flag for line in own for flag in re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", line)}
    assert used <= options, f"the example uses options {used - options} it does not have"

    parser = argparse.ArgumentParser()
    COMMANDS[command][1](parser)
    defaults = [
        a for a in parser._actions if a.default not in (None, False, argparse.SUPPRESS)
    ]  # fmt: skip
    # each option's entry in the help (argparse wraps it over lines): its own default
    entries = re.split(r"\n(?=  -)", head.split("options:", 1)[1])
    for action in defaults:
        flag = max(action.option_strings, key=len, default=action.dest)
        (entry,) = [e for e in entries if re.match(rf"\s*(-\w, )?{flag}(?![\w-])", e)]
        assert str(action.default) in " ".join(entry.split()), (
            f"efficacy {command} --help does not show {flag}'s default {action.default!r}"
        )


def test_fit_without_an_mcid_for_an_outcome_the_catalogue_does_not_know_is_an_error(capsys):
    args = ["fit", "--input", str(SLEEPSTUDY), "--patient", "Subject", "--exposure", "Days",
            "--outcome", "Reaction"]  # fmt: skip
    code, out, err = run(args, capsys)
    assert code == 2
    assert "--mcid is required" in err and "'Reaction'" in err
    assert not out  # no result written


def test_fit_takes_the_catalogue_measures_mcid_direction_and_unit():
    catalogue = tomllib.loads((REPO / "streams" / "measures.toml").read_text())
    spec = catalogue["resting_heart_rate"]
    args = argparse.Namespace(
        measure="resting_heart_rate", outcome="hr", mcid=None, direction=None, unit=None
    )
    measure = measure_of(args)
    assert (measure.mcid, measure.direction, measure.unit) == (
        spec["mcid"], spec["direction"], spec["unit"]
    )  # fmt: skip
    explicit = measure_of(argparse.Namespace(**{**vars(args), "mcid": 7.5, "direction": "higher"}))
    assert (explicit.mcid, explicit.direction) == (7.5, "higher")
    with pytest.raises(InputError, match="not in the catalogue"):
        measure_of(argparse.Namespace(**{**vars(args), "measure": "no_such_measure"}))
