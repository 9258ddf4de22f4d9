"""``renio toy build --out DIR``: a world built in place of a folder, one build at a time.

Kept apart from ``build.py``, whose source is the toy cache's key: how a finished world is put
in place does not change its bytes.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from renio_core.modeling.toy.atomic import put_world
from renio_core.modeling.toy.build import Progress, ToyWorld, build_toy_world


def build_toy_world_into(out: str | os.PathLike[str], *, seed: int = 0, quick: bool = False,
                         overwrite: bool = False, progress: Progress | None = None,
                         builder: Callable[..., ToyWorld] = build_toy_world) -> ToyWorld:
    """Build a world at ``out`` (``renio toy build --out``): into a temporary folder of this
    process, renamed into place when complete (``atomic.put_world``). A second build of the
    same ``out`` at the same time is refused with one line, and leaves nothing behind; a
    non-empty ``out`` is replaced only with ``overwrite``. ``builder`` is the world's build
    function (the addition world's, or ``renio_core.modeling.toy.chain.build_chain_world``)."""
    out = Path(out)
    put_world(out, lambda tmp: builder(tmp, seed=seed, quick=quick, progress=progress),
              reuse=False, overwrite=overwrite)
    return ToyWorld.at(out)
