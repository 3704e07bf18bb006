"""Writing files so that a killed process leaves the old version or the new one, never half of one."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import BinaryIO


def atomic_write(path: str | os.PathLike, content: str | Iterable[str] | Callable[[BinaryIO], None], *,
                 tmp_dir: str | os.PathLike | None = None, durable: bool = False) -> Path:
    """Write `content` to a temporary file, then rename it over `path`: readers, and a run
    resumed after a kill, see the whole old file or the whole new one. Creates the parent
    folder.

    `content`: a string, lines each ending in a newline, or a function writing bytes to an
    open file (e.g. `pq.write_table(table, f)`). `tmp_dir`: where the temporary file goes
    (default: beside `path`); it must be on the same filesystem, and a folder of its own
    keeps a dead writer's leftover out of the files readers list. `durable`: fsync the file
    before the rename and the folder after it, so the new version also survives a crash of
    the machine."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if tmp_dir is None:
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    else:
        Path(tmp_dir).mkdir(parents=True, exist_ok=True)
        tmp = Path(tmp_dir) / f"{uuid.uuid4().hex}{path.suffix}"
    try:
        with open(tmp, "wb") as f:
            if callable(content):
                content(f)
            else:
                f.write((content if isinstance(content, str) else "".join(content)).encode("utf-8"))
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return path
