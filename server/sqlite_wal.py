"""Opening the appliance's SQLite files (policy registry, audit log, any other store in the state directory):
owner-only permissions and write-ahead logging.

The files hold the platform's enforcement rules and the text it moderated, so the state directory is 0700 and each
database 0600. SQLite creates a database's `-wal` and `-shm` files with the database file's own mode, so creating
the database 0600 (with `os.open`: no process-wide umask change under a threaded server) covers them; files left
too open by an older version or a hand-made copy are tightened when they are next opened, and the change is logged.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import stat
import time
from pathlib import Path

log = logging.getLogger("safeguard.state")

PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600
SIDE_SUFFIXES = ("-wal", "-shm", "-journal")  # SQLite's companions of a database file


def make_private(path: Path) -> None:
    """Before SQLite opens the database at `path`: create its directory 0700 and the file itself 0600 if missing,
    and tighten the directory, the file and its -wal/-shm/-journal files where group or others have any access.

    Raises OSError when the directory cannot be created; a file that cannot be tightened (not ours) is only logged,
    and SQLite then reports whatever stops it from opening the file."""
    directory = path.parent
    directory.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)
    # A directory someone else just made with the default mode holds nothing yet that could have been read.
    _tighten(directory, PRIVATE_DIR_MODE, quietly=not any(directory.iterdir()))
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, PRIVATE_FILE_MODE))
    except FileExistsError:
        pass
    except OSError as exc:
        log.warning("cannot create %s: %s", path, exc.strerror or exc)
    for file in (path, *(path.with_name(path.name + suffix) for suffix in SIDE_SUFFIXES)):
        _tighten(file, PRIVATE_FILE_MODE)


def _tighten(path: Path, mode: int, *, quietly: bool = False) -> None:
    try:
        found = path.stat()
    except FileNotFoundError:
        return
    # Only what we own, and never a shared sticky directory such as /tmp that a database was put straight into.
    if found.st_uid != os.geteuid() or found.st_mode & stat.S_ISVTX:
        return
    current = stat.S_IMODE(found.st_mode)
    if current & 0o077:
        try:
            path.chmod(current & mode)
        except OSError as exc:
            log.warning("%s is mode %o and cannot be made %o: %s", path, current, mode, exc.strerror or exc)
            return
        log.log(logging.INFO if quietly else logging.WARNING, "%s was mode %o, open to other users; changed to %o",
                path, current, current & mode)


def enable_wal(conn: sqlite3.Connection, busy_timeout_s: float) -> str:
    """Switch to WAL and return the journal mode SQLite ended up in ("wal" unless the filesystem refuses it).

    The switch takes an exclusive lock without consulting the busy handler, so processes that open a brand-new
    file at the same moment get SQLITE_BUSY at once; they wait for each other here instead.
    """
    deadline = time.monotonic() + busy_timeout_s
    while True:
        try:
            return conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorcode & 0xFF != sqlite3.SQLITE_BUSY or time.monotonic() > deadline:
                raise
            time.sleep(0.01)
