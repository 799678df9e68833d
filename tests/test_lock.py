"""requirements.lock, what `make` installs (scripts/lock.sh writes it): one pinned
version of every package, from PyPI, and every requirement of pyproject.toml (the
dependencies, the test and plots extras) is in it at a version it allows."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]


def locked() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if not line or line.startswith("#"):
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([0-9][0-9A-Za-z.+!-]*)", line)
        assert match, f"not a pinned PyPI package: {line!r}"  # no URL, path or editable
        name = canonicalize_name(match[1])
        assert name not in pins, f"{name} twice"
        pins[name] = match[2]
    return pins


def test_every_requirement_is_locked_at_a_version_it_allows():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = [
        *project["dependencies"],
        *project["optional-dependencies"]["test"],
        *project["optional-dependencies"]["plots"],
    ]
    pins = locked()
    assert canonicalize_name(project["name"]) not in pins
    for text in requirements:
        requirement = Requirement(text)
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{name} is not in requirements.lock (scripts/lock.sh)"
        assert requirement.specifier.contains(pins[name], prereleases=True), (text, pins[name])
    assert "rocksdict" in pins  # faust-streaming[rocksdict]'s extra is locked too
