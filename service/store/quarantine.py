"""Quarantine: where start-up reconciliation puts stored files it cannot account for.

A blob or set directory without a row may be the only copy of something a client was told is stored
(a row lost to power failure), so reconciliation never deletes one it cannot identify: it moves it
to ``<root>/.quarantine/`` and logs where, for an operator to inspect, restore or remove.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)

QUARANTINE_DIR = ".quarantine"


def quarantine(path: Path, root: Path, *, reason: str) -> Path:
    """Move ``path`` (a file or directory) into ``root/.quarantine``; returns its new place.

    ``root`` must be on the same filesystem as ``path`` so the move is one atomic rename. A name
    already taken there gets a numeric suffix rather than overwriting what was quarantined before.
    """
    folder = root / QUARANTINE_DIR
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / path.name
    counter = 1
    while target.exists():
        target = folder / f"{path.name}.{counter}"
        counter += 1
    os.replace(path, target)
    logger.warning("quarantined %s as %s: %s", path, target, reason)
    return target


def quarantined(root: Path) -> list[Path]:
    """What is in ``root``'s quarantine folder, sorted by name (empty when there is none)."""
    folder = root / QUARANTINE_DIR
    return sorted(folder.iterdir()) if folder.is_dir() else []
