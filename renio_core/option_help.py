"""Help text of settings that several stages share, written once.

Each stage's config dataclass carries its fields' help in ``metadata["help"]``; the command
line (``renio_cli.options.field_option``) builds its flags from it. The settings below read
the same in every stage that has them.
"""

from __future__ import annotations

SHARD = ("i/N: do only chunks k with k % N == i, so N jobs write disjoint parts of one "
         "directory --out. Sharded and unsharded runs write the same parts.")
OVERWRITE = "Replace outputs made with other inputs or settings."
SEED = "Random seed; the same seed gives the same output."
DTYPE = "auto (bfloat16 on a GPU, float32 on CPU), float32, bfloat16, float16."
DEVICE = "auto, cpu, cuda, cuda:1, ..."
BACKEND = "hf (exact, any device) or vllm (optional extra; a GPU, or vLLM's CPU build)."
VLLM_MEMORY = ("With --backend vllm: the share of GPU memory vLLM may reserve (of CPU memory on "
               "a CPU build; OPD scoring splits it between its two engines).")
TENSOR_PARALLEL = ("With --backend vllm: GPUs one vLLM engine spreads the model over (vLLM's "
                   "tensor parallelism); at most the visible CUDA GPUs.")
DEVICE_MAP = ("With --backend hf: auto spreads the model's layers over the visible CUDA GPUs "
              "(transformers' device_map='auto', needs accelerate); none keeps it on --device.")
SKIP_LONG_PROMPTS = ("Skip prompts whose tokens plus max_new_tokens exceed the model's context, "
                     "and report how many; without it such a prompt is refused before any work.")
