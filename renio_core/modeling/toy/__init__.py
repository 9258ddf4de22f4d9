"""The toy world: a synthetic task, tokenizer, teacher and student that build on a CPU.

renio's embedded default (docs/design.md, "Where it runs"), so every stage of ReNIO
(arXiv 2606.23104) runs offline in minutes. ``resolve_model("toy:student")`` turns a toy name
into the cached model's path; real model names pass through unchanged.
"""

from renio_core.modeling.toy.build import (
    ToyWorld,
    build_toy_world,
    cache_root,
    ensure_toy_world,
    resolve_model,
)
from renio_core.modeling.toy.place import build_toy_world_into
from renio_core.modeling.toy.task import grade

__all__ = ["ToyWorld", "build_toy_world", "build_toy_world_into", "cache_root", "ensure_toy_world", "grade",
           "resolve_model"]
