"""Option definitions shared by several commands, so each flag reads the same everywhere."""

from __future__ import annotations

import typer

ShardOpt = typer.Option(
    "0/1", "--shard",
    help="i/N: do only chunks k with k % N == i, so N jobs write disjoint parts of one "
         "directory --out. Sharded and unsharded runs write the same parts.",
)
OverwriteOpt = typer.Option(
    False, "--overwrite", help="Replace outputs made with other inputs or settings.",
)
SeedOpt = typer.Option(0, "--seed", help="Random seed; the same seed gives the same output.")
DtypeOpt = typer.Option(
    "auto", "--dtype", help="auto (bfloat16 on a GPU, float32 on CPU), float32, bfloat16, float16.",
)
DeviceOpt = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:1, ...")
BackendOpt = typer.Option("hf", "--backend", help="hf (exact, any device) or vllm (optional extra; a GPU, or vLLM's CPU build).")
VllmMemoryOpt = typer.Option(
    0.9, "--vllm-memory",
    help="With --backend vllm: the share of GPU memory vLLM may reserve (of CPU memory on a "
         "CPU build; OPD scoring splits it between its two engines).",
)
