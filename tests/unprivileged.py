"""Run a command as an unprivileged user (nobody) in the conditions of the worker's
image: the installation read-only, nothing writable but the directories named.

Run as root (the test machines' user). ``command_in_sandbox`` wraps a command in
``unshare --mount``: in that new mount namespace, which the rest of the machine
never sees, this file (run as a script) prepares the file system and execs the
command through ``setpriv`` as uid/gid 65534:

- directories nobody cannot traverse on the way to what it must read (``/root``
  with a pyenv interpreter, pytest's ``/tmp/pytest-of-root``) are covered by an
  empty read-only tmpfs, and only the paths it needs (the interpreter, the
  virtual environment, the copy of the project, the writable directories) are
  bind-mounted back: the rest of ``/root`` stays out of its sight;
- the project's checkout is covered too (its virtual environment put back if it
  lives there), so the sources that run are the copy's, not the editable
  install's;
- ``/`` and ``/dev/shm`` are made read-only for this namespace (``remount,bind,ro``
  changes the mount's flags in this namespace only), and so is every path bound
  back, but the writable ones.

Nothing is chmod-ed or chown-ed outside the test's own directories, and the
namespace, its mounts included, ends with the command.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

NOBODY = 65534
HERE = Path(__file__).resolve()


def _traversable_by_others(path: Path) -> bool:
    return bool(path.stat().st_mode & 0o001)


def _hidden_ancestor(path: Path) -> Path | None:
    """The outermost directory on the way to ``path`` that others cannot traverse."""
    for parent in reversed(path.parents):
        if not _traversable_by_others(parent):
            return parent
    return None


def plan(readable: list[Path], writable: list[Path], hide: list[Path]) -> list[Path]:
    """The directories to cover with an empty tmpfs: every hidden ancestor of a path
    the command needs, and each of ``hide`` not already inside one of them."""
    covers = {a for p in [*readable, *writable] if (a := _hidden_ancestor(p)) is not None}
    for path in hide:
        if not any(path.is_relative_to(c) for c in covers):
            covers.add(path)
    return sorted(covers)


def command_in_sandbox(
    command: list[str],
    *,
    readable: list[Path],
    writable: list[Path],
    hide: list[Path],
    cwd: Path,
    env: dict[str, str],
    stash: Path,
) -> list[str]:
    """The command line that runs ``command`` as nobody in the sandbox. ``stash``: an
    empty directory outside every covered one (e.g. in /tmp), where the namespace
    keeps its way to what it covers; the caller removes it afterwards."""
    spec = {
        "stash": str(stash.resolve()),
        "command": command,
        "readable": [str(p.resolve()) for p in readable],
        "writable": [str(p.resolve()) for p in writable],
        "hide": [str(p.resolve()) for p in hide],
        "cwd": str(cwd.resolve()),
        "env": env,
    }
    return ["unshare", "--mount", "--propagation", "private",
            sys.executable, str(HERE), json.dumps(spec)]  # fmt: skip


def _mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True)


def _enter(spec: dict) -> None:
    """In the new mount namespace, as root: prepare and exec (see the module)."""
    readable = [Path(p) for p in spec["readable"]]
    writable = [Path(p) for p in spec["writable"]]
    covers = plan(readable, writable, [Path(p) for p in spec["hide"]])
    stash = Path(spec["stash"])
    try:
        originals = {}
        for index, cover in enumerate(covers):  # keep a way to the covered contents
            originals[cover] = stash / str(index)
            originals[cover].mkdir()
            _mount("--bind", str(cover), str(originals[cover]))
        for cover in covers:
            _mount("-t", "tmpfs", "-o", "mode=0755", "tmpfs", str(cover))
        for path in [*readable, *writable]:
            cover = next((c for c in covers if path.is_relative_to(c)), None)
            if cover is None:
                continue
            path.mkdir(parents=True, exist_ok=True)  # mount point, in the tmpfs
            _mount("--bind", str(originals[cover] / path.relative_to(cover)), str(path))
        _mount("-o", "remount,bind,ro", "/")
        _mount("-o", "remount,bind,ro", "/dev/shm")
        for path in [*covers, *readable]:
            _mount("-o", "remount,bind,ro", str(path))
        for path in writable:  # its own mount when bound back; else make it one
            _mount("--bind", str(path), str(path))
            _mount("-o", "remount,bind,rw", str(path))
    except (subprocess.CalledProcessError, OSError) as error:
        print(f"sandbox: could not prepare the file system: {error}", file=sys.stderr)
        sys.exit(97)
    os.chdir(spec["cwd"])
    setpriv = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
               "--no-new-privs", "--inh-caps=-all", "--bounding-set=-all"]  # fmt: skip
    os.execvpe(setpriv[0], [*setpriv, *spec["command"]], spec["env"])


if __name__ == "__main__":
    _enter(json.loads(sys.argv[1]))
