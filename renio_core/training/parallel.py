"""Several processes under torchrun: which one this is, and the DDP or FSDP wrapping.

One process is the default and needs none of this. Under ``torchrun`` each rank trains on its
share of the micro-batches (``data.read_micro_batches``); gradients are all-reduced once
per optimizer step. nccl on GPUs, gloo on CPU (tested: 2 processes and FSDP give the same
adapter as 1 process).
"""

from __future__ import annotations

import dataclasses
import os

import torch
import torch.distributed as dist

from renio_core.modeling import models


@dataclasses.dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    initialized_here: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def on(self) -> bool:
        return self.world > 1


def init_distributed(device_pref: str) -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device_pref != "cpu"
    if use_cuda:
        torch.cuda.set_device(local_rank)
    created = False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        created = True
    return Dist(rank, world, local_rank, created)


def all_reduce_sum(values: list[float], dist_state: Dist, device: torch.device) -> list[float]:
    if not dist_state.on:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()



def wrap(module: torch.nn.Module, dist_state: Dist, device: torch.device, *, fsdp: bool,
         autocast: bool) -> torch.nn.Module:
    """The module as the step calls it: itself (one process), DDP, or FSDP (``fully_shard``
    on each decoder layer and on the whole, in place)."""
    if dist_state.on and fsdp:
        # Imported here: builds of torch without distributed support cannot import them.
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        lm = models.causal_lm(module.model)
        layer_names = set(getattr(lm, "_no_split_modules", None) or [])
        # Works with gloo on CPU too. Parameters are gathered in bf16 only when the matmuls
        # run in bf16 anyway (autocast); gradients are always reduced in fp32.
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if autocast else None,
                                  reduce_dtype=torch.float32)
        for sub in lm.modules():
            if type(sub).__name__ in layer_names:
                fully_shard(sub, mp_policy=mp)
        fully_shard(module, mp_policy=mp)
        return module
    if dist_state.on:
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(
            module, device_ids=[dist_state.local_rank] if device.type == "cuda" else None)
    return module

