"""Writing files so that a killed process leaves the old version or the new one, never half of one."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path


def atomic_write(path: str | os.PathLike, content: str | Iterable[str]) -> Path:
    """Write `content` (a string, or lines each ending in a newline) to a temporary sibling
    of `path`, then rename it over `path`: readers, and a run resumed after a kill, see
    the whole old file or the whole new one. Creates the parent folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        if isinstance(content, str):
            f.write(content)
        else:
            f.writelines(content)
    os.replace(tmp, path)
    return path
