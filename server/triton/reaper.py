"""What a killed owner of tritonserver leaves behind, named so that the next launcher start can find and remove it.

An owner that stops its server (`TritonServer.stop`) removes the server's work directory (a copy of the backends and
the log, in the temp directory) and the python backend's shared-memory segments in /dev/shm. An owner that is
SIGKILLed cannot: the kernel kills tritonserver with it (PR_SET_PDEATHSIG, `engine.triton.runtime.die_with_parent`)
and the orphaned stubs exit once their server is gone (or are ended by their watcher,
`engine.triton.runtime.watch_stub_parent`), but the files stay. So both carry their owner's identity, its
pid and the kernel's start time for that pid (together never reused while the machine is up), and every launcher
start removes those of owners no longer alive. Only files of the current user are touched, and nothing of an owner
whose identity cannot be read from the name.

    <tmp>/safeguard-triton-<pid>-<start>-<random>/    a server's work directory
    /dev/shm/safeguard_<pid>_<start>_<hex>_<uuid>      a python-backend segment (<prefix><uuid>)
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import shutil
import tempfile
from pathlib import Path

log = logging.getLogger("safeguard.triton")

SHM_DIR = Path("/dev/shm")
WORKDIR_PREFIX = "safeguard-triton-"
SHM_PREFIX = "safeguard_"
_WORKDIR = re.compile(rf"{re.escape(WORKDIR_PREFIX)}(\d+)-(\d+)-")
# Segments of launchers from before the start time was in the name (pid only) are recognised too.
_SHM = re.compile(rf"{re.escape(SHM_PREFIX)}(\d+)_(?:(\d+)_)?[0-9a-f]{{8}}_")


def start_time(pid: int) -> int | None:
    """When process `pid` started, in clock ticks since boot (field 22 of /proc/<pid>/stat); None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The fields after the parenthesised command name (which may hold spaces) start at field 3, the state.
    fields = stat[stat.rindex(")") + 2:].split()
    if fields[0] in ("Z", "X"):  # a zombie holds nothing and will never clean up
        return None
    return int(fields[19])


def alive(pid: int, started: int | None) -> bool:
    """Whether the owner named by (pid, start time) still runs; with no start time, whether any `pid` runs."""
    now = start_time(pid)
    return now is not None and (started is None or now == started)


def _owner() -> str:
    pid = os.getpid()
    return f"{pid}-{start_time(pid)}"


def new_workdir() -> Path:
    """A private (0700) work directory for a server of this process, in the temp directory."""
    return Path(tempfile.mkdtemp(prefix=f"{WORKDIR_PREFIX}{_owner()}-"))


def new_shm_prefix() -> str:
    """A shared-memory prefix for a server of this process (unique per server: `_<hex>`)."""
    return f"{SHM_PREFIX}{_owner().replace('-', '_')}_{secrets.token_hex(4)}_"


def _dead_owner(match: re.Match[str] | None) -> bool:
    if match is None:
        return False
    pid, started = match.groups()
    return not alive(int(pid), None if started is None else int(started))


def _ours(path: Path) -> bool:
    try:
        return path.lstat().st_uid == os.geteuid()
    except OSError:
        return False


def reap(tmp_dir: Path | None = None, shm_dir: Path = SHM_DIR) -> list[Path]:
    """Remove the work directories and shared-memory segments of owners that are no longer alive; what was
    removed. Never raises: a leftover that cannot be removed now is tried again at the next start."""
    removed: list[Path] = []
    tmp = Path(tempfile.gettempdir()) if tmp_dir is None else tmp_dir
    candidates = [(path, _WORKDIR) for path in _listing(tmp, WORKDIR_PREFIX)]
    candidates += [(path, _SHM) for path in _listing(shm_dir, SHM_PREFIX)]
    for path, pattern in candidates:
        if not _dead_owner(pattern.match(path.name)) or not _ours(path):
            continue
        with contextlib.suppress(OSError):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
            removed.append(path)
    if removed:
        log.info("removed %d file(s) left by tritonservers whose owner was killed: %s", len(removed),
                 ", ".join(p.name for p in removed))
    return removed


def _listing(directory: Path, prefix: str) -> list[Path]:
    try:
        return [path for path in directory.iterdir() if path.name.startswith(prefix)]
    except OSError:
        return []
