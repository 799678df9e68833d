"""Show that the tests catch wrong answers: apply each deliberately wrong
implementation in ``tests/mutations/*.patch`` to a scratch copy of HEAD and run
the tests it names; every one of them must fail.

A mutation file is a ``git diff`` preceded by comment lines::

    # mutation: patient scores from per-patient OLS, no pooling
    # expect-fail: tests/test_fidelity.py::test_sleepstudy_matches_lme4

Usage (from the repository root; Kafka tests use KAFKA_BOOTSTRAP_SERVERS or
start the local broker, as the suite does)::

    .venv/bin/python scripts/mutations.py            # every mutation
    .venv/bin/python scripts/mutations.py no_rescore # the named ones

Exit status 0 when every named test failed under its mutation (the mutation was
caught), 1 otherwise. The scratch copy is a detached git worktree of HEAD, so
uncommitted changes are not part of the check.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MUTATIONS = REPO / "tests" / "mutations"


@dataclass(frozen=True)
class Mutation:
    name: str
    description: str
    expect_fail: tuple[str, ...]
    patch: Path

    @classmethod
    def read(cls, path: Path) -> Mutation:
        description, expect = "", []
        for line in path.read_text().splitlines():
            if line.startswith("diff --git"):
                break
            if line.startswith("# mutation:"):
                description = line.removeprefix("# mutation:").strip()
            elif line.startswith("# expect-fail:"):
                expect.append(line.removeprefix("# expect-fail:").strip())
        if not expect:
            raise SystemExit(f"{path}: no '# expect-fail:' line")
        return cls(path.stem, description, tuple(expect), path)


def run_mutation(mutation: Mutation, python: str) -> dict[str, bool]:
    """{test id: failed} for the mutation's tests, run in a patched copy of HEAD."""
    with tempfile.TemporaryDirectory(prefix=f"mutation-{mutation.name}-") as scratch:
        tree = Path(scratch) / "tree"
        subprocess.run(
            ["git", "worktree", "add", "--quiet", "--detach", str(tree), "HEAD"],
            cwd=REPO,
            check=True,
        )
        try:
            subprocess.run(["git", "apply", str(mutation.patch)], cwd=tree, check=True)
            # The patched tree comes first for this process and the workers it starts.
            env = {**os.environ, "PYTHONPATH": str(tree)}
            failed = {}
            for test in mutation.expect_fail:
                result = subprocess.run(
                    [python, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", test],
                    cwd=tree,
                    env=env,
                    capture_output=True,
                    text=True,
                    check=False,
                )
                failed[test] = result.returncode == 1  # tests ran and at least one failed
                summary = result.stdout.strip().splitlines()[-1:] or ["(no output)"]
                print(f"    {test}: {summary[0]}", flush=True)
            return failed
        finally:
            subprocess.run(
                ["git", "worktree", "remove", "--force", str(tree)], cwd=REPO, check=False
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="mutation names (default: all)")
    args = parser.parse_args(argv)
    paths = sorted(MUTATIONS.glob("*.patch"))
    if args.names:
        paths = [MUTATIONS / f"{name}.patch" for name in args.names]
    caught_all = True
    for path in paths:
        mutation = Mutation.read(path)
        print(f"{mutation.name}: {mutation.description}", flush=True)
        start = time.monotonic()
        failed = run_mutation(mutation, sys.executable)
        caught = all(failed.values())
        caught_all &= caught
        verdict = (
            "caught"
            if caught
            else "NOT CAUGHT by " + ", ".join(t for t, f in failed.items() if not f)
        )
        print(f"  -> {verdict} ({time.monotonic() - start:.0f} s)", flush=True)
    return 0 if caught_all else 1


if __name__ == "__main__":
    sys.exit(main())
