"""Every deliberately wrong implementation in tests/mutations/ still applies to
the code as it is (``make mutations`` runs them; a patch that no longer applies
would silently stop showing that its tests catch the mistake)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from scripts.mutations import MUTATIONS, Mutation

ROOT = Path(__file__).resolve().parent.parent
PATCHES = sorted(MUTATIONS.glob("*.patch"))


@pytest.mark.parametrize("patch", PATCHES, ids=[p.stem for p in PATCHES])
def test_the_mutation_applies_and_names_existing_tests(patch: Path):
    mutation = Mutation.read(patch)
    check = subprocess.run(
        ["git", "apply", "--check", str(patch)], cwd=ROOT, capture_output=True, text=True
    )
    assert check.returncode == 0, check.stderr
    for test in mutation.expect_fail:
        path, _, name = test.partition("::")
        source = (ROOT / path).read_text()
        assert f"def {name.split('[')[0]}(" in source, test
