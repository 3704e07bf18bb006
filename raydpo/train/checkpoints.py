"""Checkpoints of the trainer role: what makes one complete (a manifest per writing rank),
and finding the newest complete one to resume from."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Iterator

from raydpo.files import atomic_write


STATE_FILE = "trainer_state.json"


OPTIMIZER_FILE = "optimizer.pt"


MANIFEST = "manifest-rank{rank}.json"


def write_manifest(out: Path, rank: int) -> None:
    """Written last by each rank that writes part of a checkpoint: every file it wrote, with
    its size. Ray Train copies a checkpoint into storage in no particular order, and a kill
    can stop the copy anywhere; `checkpoint_problem` accepts the folder only if every
    writer's manifest is there and every file it lists is, at its full size."""
    name = MANIFEST.format(rank=rank)
    files = {str(f.relative_to(out)): f.stat().st_size for f in sorted(out.rglob("*"))
             if f.is_file() and not f.name.startswith("manifest-rank")}
    atomic_write(out / name, json.dumps(files))


def checkpoint_problem(folder: str | Path) -> str | None:
    """None if `folder` is a complete checkpoint, else what is missing (see write_manifest)."""
    folder = Path(folder)
    try:
        state = json.loads((folder / STATE_FILE).read_text())
    except (OSError, ValueError) as e:
        return f"{STATE_FILE} unreadable ({e.__class__.__name__})"
    writers = state.get("writers")
    if writers is None:
        return "no writers list in trainer_state.json (written before checkpoints had manifests)"
    for rank in writers:
        try:
            files = json.loads((folder / MANIFEST.format(rank=rank)).read_text())
        except (OSError, ValueError):
            return f"rank {rank}'s manifest is missing"
        for rel, size in files.items():
            f = folder / rel
            if not f.is_file():
                return f"{rel} is missing"
            if f.stat().st_size != size:
                return f"{rel} has {f.stat().st_size} of {size} bytes"
    return None


@contextlib.contextmanager
def resume_directory(spec) -> Iterator[str | None]:
    """Ray Train's checkpoint (set when it restarts failed workers), else spec.resume_from.

    A context: Ray's `as_directory` reads a checkpoint on local or shared storage in place
    and deletes a downloaded copy on exit (`to_directory` left a full copy, optimizer
    state included, in the temp folder at every restart)."""
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        yield spec.resume_from
        return
    with ckpt.as_directory() as folder:
        yield folder


def latest_checkpoint(storage: str | Path, name: str, pattern: str = "*-step-*",
                      key: str = "step") -> tuple[Path, dict] | None:
    """(path, trainer_state) of run `name`'s complete checkpoint (folders matching `pattern`)
    with the highest trainer_state[`key`], if any. An incomplete one (a kill during the
    copy into storage: see `checkpoint_problem`) is passed over, with a warning."""
    best = None
    for state_file in Path(storage, name).glob(f"{pattern}/{STATE_FILE}"):
        problem = checkpoint_problem(state_file.parent)
        if problem:
            print(f"[raydpo] skipping incomplete checkpoint {state_file.parent}: {problem}", file=sys.stderr)
            continue
        state = json.loads(state_file.read_text())
        if best is None or state[key] > best[1][key]:
            best = (state_file.parent, state)
    return best

