"""The worker's data directory (streams.data_dir): where it is by default, that
everything the worker writes is inside it, and that one worker at a time uses it.
A worker run as an unprivileged user from a read-only copy of the project, with
only its data directory writable: tests/test_image_conditions.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from streams.data_dir import DataDirInUse, claim, data_dir_from_env, default_data_dir
from streams.settings import Settings


def test_the_default_is_the_users_cache_directory_never_the_working_directory():
    assert default_data_dir({"XDG_CACHE_HOME": "/x/cache", "HOME": "/home/u"}) == Path(
        "/x/cache/living-efficacy"
    )
    assert default_data_dir({"HOME": "/home/u"}) == Path("/home/u/.cache/living-efficacy")
    assert default_data_dir({}).is_absolute()
    assert data_dir_from_env({"EFFICACY_DATA_DIR": "/srv/w1", "HOME": "/h"}) == Path("/srv/w1")
    assert data_dir_from_env({"EFFICACY_DATA_DIR": " ", "HOME": "/h"}) == Path(
        "/h/.cache/living-efficacy"
    )


def test_every_path_the_worker_writes_is_in_the_data_directory(monkeypatch, tmp_path):
    for name in ("EFFICACY_DATA_DIR", "EFFICACY_COMPILATION_CACHE_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    settings = Settings()
    assert settings.data_dir == tmp_path / "cache" / "living-efficacy"
    monkeypatch.setenv("EFFICACY_DATA_DIR", str(tmp_path / "w1"))
    settings = Settings()
    assert settings.faust_dir.parent == settings.data_dir == tmp_path / "w1"
    assert settings.compilation_cache_dir == tmp_path / "w1" / "jax"
    # An explicit cache directory (or none) wins.
    monkeypatch.setenv("EFFICACY_COMPILATION_CACHE_DIR", "none")
    assert Settings().compilation_cache_dir is None


def test_a_second_claim_of_a_data_directory_fails_while_the_first_holds_it(tmp_path):
    data_dir = tmp_path / "not" / "yet" / "there"
    held = claim(data_dir)
    # another process: flock conflicts between open files, so this one counts too,
    # but a separate interpreter is what a second worker is.
    probe = (
        "import sys; from pathlib import Path; from streams.data_dir import claim, DataDirInUse\n"
        "try:\n    claim(Path(sys.argv[1]))\nexcept DataDirInUse as e:\n"
        "    print(e); sys.exit(3)\n"
    )
    other = subprocess.run(
        [sys.executable, "-c", probe, str(data_dir)], capture_output=True, text=True
    )
    assert other.returncode == 3, other.stderr
    assert str(data_dir) in other.stdout and "EFFICACY_DATA_DIR" in other.stdout
    with pytest.raises(DataDirInUse):
        claim(data_dir)
    held.close()
    claim(data_dir).close()  # free again once the holder lets go
