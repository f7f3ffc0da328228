"""Checkpoint discovery and atomic publication.

DeepSpeed writes a checkpoint as a folder of shards (one set per rank). A folder counts as a
checkpoint only once every rank has finished writing and rank 0 has dropped a ``COMPLETE``
marker into it: a run killed mid-write leaves a folder without the marker, which
``latest_step`` ignores and the next save overwrites. Exports are written to a temporary
sibling folder and renamed into place, so ``final/`` is either absent or whole.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Callable

MARKER = "COMPLETE"
_TAG = re.compile(r"^step_(\d+)$")


def publish_file(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """``write(tmp)`` into a temporary sibling of ``path``, then rename it into place: a reader sees
    the old file or the whole new one, never a half-written one (a cache, a report, a shard)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
    return path


def step_tag(step: int) -> str:
    return f"step_{step:07d}"


def complete_steps(ckpt_dir: str | os.PathLike) -> list[int]:
    root = Path(ckpt_dir)
    if not root.is_dir():
        return []
    steps = []
    for d in root.iterdir():
        m = _TAG.match(d.name)
        if m and (d / MARKER).is_file():
            steps.append(int(m.group(1)))
    return sorted(steps)


def latest_step(ckpt_dir: str | os.PathLike) -> int | None:
    steps = complete_steps(ckpt_dir)
    return steps[-1] if steps else None


def mark_complete(ckpt_dir: str | os.PathLike, step: int, keep: int) -> None:
    """Publish ``step`` (call on rank 0 after all ranks wrote it), then drop old checkpoints."""
    root = Path(ckpt_dir)
    marker = root / step_tag(step) / MARKER
    tmp = marker.with_suffix(".tmp")
    tmp.write_text(str(step))
    os.replace(tmp, marker)
    for old in complete_steps(root)[:-keep]:
        shutil.rmtree(root / step_tag(old), ignore_errors=True)
    for d in root.iterdir():  # leftovers of a save that was killed half-way
        m = _TAG.match(d.name)
        if m and int(m.group(1)) < step and not (d / MARKER).exists():
            shutil.rmtree(d, ignore_errors=True)


def publish_dir(tmp: Path, final: Path) -> None:
    """Atomically replace ``final`` by the fully written folder ``tmp``."""
    old = final.with_name(final.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old)
