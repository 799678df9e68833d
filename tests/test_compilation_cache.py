"""Where JAX's persistent compilation cache lives (streams.compilation_cache), and
that an unusable location switches it off with a warning instead of failing.
That a second process loads its programs from the cache: tests/test_fit_compile.py."""

from __future__ import annotations

import logging
from pathlib import Path

import jax
import pytest

from streams.compilation_cache import (
    ENV_VAR,
    default_directory,
    directory_from_env,
    enable_compilation_cache,
)
from streams.settings import Settings


def test_default_directory_is_jax_in_the_data_directory():
    assert default_directory({"XDG_CACHE_HOME": "/x/cache", "HOME": "/home/u"}) == Path(
        "/x/cache/living-efficacy/jax"
    )
    assert default_directory({"HOME": "/home/u"}) == Path("/home/u/.cache/living-efficacy/jax")
    assert default_directory({"XDG_CACHE_HOME": "", "HOME": "/home/u"}) == Path(
        "/home/u/.cache/living-efficacy/jax"
    )
    environ = {"EFFICACY_DATA_DIR": "/var/lib/efficacy", "HOME": "/home/u"}
    assert default_directory(environ) == Path("/var/lib/efficacy/jax")


@pytest.mark.parametrize(
    ("value", "expected"),
    [("/data/jax", Path("/data/jax")), ("", None), ("none", None), ("OFF", None)],
)
def test_the_environment_names_or_switches_off_the_cache(value, expected, monkeypatch):
    environ = {ENV_VAR: value, "HOME": "/home/u"}
    assert directory_from_env(environ) == expected
    monkeypatch.setenv(ENV_VAR, value)
    assert Settings().compilation_cache_dir == expected


def test_without_the_variable_worker_and_fit_share_the_default(monkeypatch, tmp_path):
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.delenv("EFFICACY_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    expected = tmp_path / "living-efficacy" / "jax"
    assert directory_from_env() == expected
    assert Settings().compilation_cache_dir == expected
    # ... and both follow the data directory
    monkeypatch.setenv("EFFICACY_DATA_DIR", str(tmp_path / "data"))
    assert directory_from_env() == Settings().compilation_cache_dir == tmp_path / "data" / "jax"


def test_an_unusable_directory_is_logged_and_skipped(tmp_path, caplog):
    """A path below a regular file can be neither created nor written, whoever runs
    the test (root ignores permission bits, not this)."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    before = jax.config.jax_compilation_cache_dir
    with caplog.at_level(logging.WARNING, logger="streams.compilation_cache"):
        assert enable_compilation_cache(blocker / "jax") is None
    assert "compilation cache off" in caplog.text and str(blocker / "jax") in caplog.text
    assert jax.config.jax_compilation_cache_dir == before
    assert enable_compilation_cache(None) is None
