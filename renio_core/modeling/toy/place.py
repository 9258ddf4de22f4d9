"""``renio toy build --out DIR``: a world built in place of a folder, one build at a time.

Kept apart from ``build.py``, whose source is the toy cache's key: how a finished world is put
in place does not change its bytes.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

from renio_core.data.shards import exclusive_lock
from renio_core.errors import RenioInputError
from renio_core.modeling.toy.build import Progress, ToyWorld, build_toy_world


def build_toy_world_into(out: str | os.PathLike[str], *, seed: int = 0, quick: bool = False,
                         overwrite: bool = False, progress: Progress | None = None,
                         builder: Callable[..., ToyWorld] = build_toy_world) -> ToyWorld:
    """Build a world at ``out`` (``renio toy build --out``): into a temporary folder of this
    process, renamed into place when complete. A second build of the same ``out`` at the same
    time is refused with one line, and leaves nothing behind. ``builder`` is the world's build
    function (the addition world's, or ``renio_core.modeling.toy.chain.build_chain_world``)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    lock = exclusive_lock(out.parent / f".{out.name}.lock", what=out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            if not overwrite:
                raise RenioInputError("exists and is not empty; pass --overwrite to replace it",
                                      file=out)
        for stale in out.parent.glob(f".{out.name}.tmp-*"):  # a killed build's, under the lock
            shutil.rmtree(stale, ignore_errors=True)
        builder(tmp, seed=seed, quick=quick, progress=progress)
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        lock.release()
    return ToyWorld.at(out)

