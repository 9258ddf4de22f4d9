"""Per-row sampling randomness and the token sampler (arXiv 2606.23104, Alg. 1, "sample
y ~ pi_theta(.|x)"; official settings T 1.1, top-p 0.95, top-k 20).

Randomness is per row: row ``(prompt_id, sample_index)`` draws its uniforms from a generator
seeded by ``hash(seed, prompt_id, sample_index)`` and samples by inverse CDF over the filtered
distribution, so the same seed gives the same tokens wherever the row is computed. Top-k is
applied before top-p, both after the temperature, as in vLLM and transformers.
"""

from __future__ import annotations

import hashlib

import torch


def row_seed(seed: int, prompt_id: str, sample_index: int) -> int:
    """A 63-bit seed for one trajectory; independent of where the row is computed."""
    digest = hashlib.sha256(f"{seed}\x1f{prompt_id}\x1f{sample_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def row_uniforms(seed: int, length: int) -> torch.Tensor:
    g = torch.Generator(device="cpu")
    g.manual_seed(seed)
    return torch.rand(length, generator=g, dtype=torch.float64)


def sample_tokens(
    logits_BV: torch.Tensor,
    uniforms_B: torch.Tensor,
    *,
    temperature: float,
    top_k: int,
    top_p: float,
) -> torch.Tensor:
    """One token per row: temperature, then top-k, then top-p, then inverse-CDF sampling
    with the row's uniform in [0, 1). Temperature 0 is greedy."""
    if temperature == 0:
        return logits_BV.argmax(dim=-1)
    scaled_BV = logits_BV.float() / temperature
    V = scaled_BV.shape[-1]
    if 0 < top_k < V:
        vals_BK, ids_BK = scaled_BV.topk(top_k, dim=-1)  # sorted, largest first
    else:
        vals_BK, ids_BK = scaled_BV.sort(dim=-1, descending=True)
    probs_BK = torch.softmax(vals_BK, dim=-1).double()
    if top_p < 1.0:
        before_BK = probs_BK.cumsum(dim=-1) - probs_BK  # mass strictly above each token
        probs_BK = probs_BK.masked_fill(before_BK >= top_p, 0.0)  # the top token always stays
    cdf_BK = probs_BK.cumsum(dim=-1)
    target_B1 = uniforms_B.to(cdf_BK.device, torch.float64)[:, None] * cdf_BK[:, -1:]
    pick_B = torch.searchsorted(cdf_BK, target_B1, right=True).squeeze(1)
    pick_B = pick_B.clamp(max=cdf_BK.shape[-1] - 1)
    return ids_BK.gather(1, pick_B[:, None]).squeeze(1)

