"""Private data: the database and every stored file readable by the service's user only.

Contract:

- :func:`private_umask` sets the process umask to ``077``, so every file and directory the process
  creates from then on (blobs, calibration arrays, plans, the SQLite file and its WAL) is 0600 / 0700
  whatever mode the creating call asked for: threads and libraries (numpy, SQLite) need no changes.
  Being process-wide, it is set only where a service process starts (``serve``, ``worker``), never by
  code that also runs inside someone else's process (``engine-service local`` writes the user's own
  output files, which keep the user's umask).
- :func:`make_private` tightens what already exists under the data roots (files to 0600, directories to
  0700), for data written by an older version or under another umask. Symbolic links are left alone
  (chmod would follow them out of the root).
- The database path's parent is not touched: it may be a shared working directory; the database file
  and its ``-wal``/``-shm``/``-journal`` companions are.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from pathlib import Path

PRIVATE_UMASK = 0o077
PRIVATE_FILE_MODE = 0o600
PRIVATE_DIR_MODE = 0o700
_DB_COMPANIONS = ("", "-wal", "-shm", "-journal")


def private_umask() -> int:
    """Make files created by this process private from now on; returns the previous umask."""
    return os.umask(PRIVATE_UMASK)


def _tighten(path: Path, mode: int) -> bool:
    try:
        current = path.lstat()
    except FileNotFoundError:  # removed meanwhile (a finished upload's staged file)
        return False
    if stat.S_ISLNK(current.st_mode) or stat.S_IMODE(current.st_mode) == mode:
        return False
    os.chmod(path, mode)
    return True


def make_private(roots: Iterable[Path], database: Path | None = None) -> int:
    """Set 0700 on every directory and 0600 on every file under ``roots`` (the roots included), and 0600
    on the database files. Returns how many modes changed."""
    changed = 0
    for root in roots:
        if not root.is_dir() or root.is_symlink():
            continue
        changed += _tighten(root, PRIVATE_DIR_MODE)
        for directory, subdirs, files in os.walk(root):
            base = Path(directory)
            changed += sum(_tighten(base / name, PRIVATE_DIR_MODE) for name in subdirs)
            changed += sum(_tighten(base / name, PRIVATE_FILE_MODE) for name in files)
    if database is not None:
        for suffix in _DB_COMPANIONS:
            candidate = database.with_name(database.name + suffix)
            if candidate.is_file():
                changed += _tighten(candidate, PRIVATE_FILE_MODE)
    return changed
