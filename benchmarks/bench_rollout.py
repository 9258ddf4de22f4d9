"""Throughput of `renio rollout`'s HF sampler against plain `model.generate`.

    python benchmarks/bench_rollout.py [--case fixed|toy|reasoning|all] [--repeats 3]

Every case samples the same jobs, in the same batches (jobs sorted by prompt length, cut into
`--batch` rows), with the same sampling settings and length limit, three ways: transformers'
`model.generate` (do_sample, left padding; a batch runs until its longest row ends), renio's
sampler with fixed batches (`HFSampler(refill=False)`, finished rows leave the batch), and
renio's sampler that refills a finished row's slot with the next job
(`HFSampler(refill=True)`, `renio rollout --refill`; off by default, as it pays only where
lengths are uneven). Runs alternate (generate, fixed, refill, ...) and each keeps its best
time. Prints tokens/s and the ratios to `model.generate`.
All in this process.

Cases:
- `fixed`: a synthetic Qwen3-architecture model (random weights, character vocabulary;
  `--hidden` x `--layers`) whose EOS logit is forced to -inf, so every row has exactly
  `--new-tokens` tokens. T 1.1 / top-p 0.95 / top-k 20.
- `toy`: the toy world's trained student and its own training prompts, `--n` samples each,
  official sampling (T 1.1 / top-p 0.95 / top-k 20); rows end where the student says so.
- `reasoning`: the synthetic model with its EOS probability set to exactly `--eos-p` at every
  step (T 1, no top-k / top-p), so lengths are geometric like long reasoning traces: a few rows
  run 10x longer than the median, up to `--reasoning-tokens`.

`--vllm` also times `renio rollout --backend vllm`'s sampler (`VllmSampler`) on the `fixed`
case's prompts, in float32 on a CPU build of vLLM. vLLM schedules all prompts itself.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from tiny_models import make_model  # noqa: E402

from renio_core.backends.hf import HFSampler  # noqa: E402
from renio_core.backends.rows import render_prompt  # noqa: E402
from renio_core.data.prompt_io import Prompt, load_prompts  # noqa: E402
from renio_core.modeling import models  # noqa: E402
from renio_core.stages.rollout import RolloutConfig  # noqa: E402


def set_eos_logit(model, eos_id: int, log_odds: float | None):
    """A hook on the output head: EOS gets ``-inf`` (``log_odds`` None) or the logit that
    gives it probability sigmoid(log_odds) at temperature 1, at every step."""
    def hook(_module, _inputs, logits):
        others = logits.clone()
        others[..., eos_id] = -math.inf
        if log_odds is None:
            return others
        others[..., eos_id] = torch.logsumexp(others, dim=-1) + log_odds
        return others

    return model.get_output_embeddings().register_forward_hook(hook)


def run_case(name, model, tok, prompts, cfg, repeats):
    device = next(model.parameters()).device
    eos = models.eos_token_ids(model, tok)
    ids = [render_prompt(tok, p, cfg) for p in prompts]
    jobs = sorted(((i, s) for i in range(len(prompts)) for s in range(cfg.n)),
                  key=lambda js: (len(ids[js[0]]), js))
    batches = [jobs[i: i + cfg.batch_size] for i in range(0, len(jobs), cfg.batch_size)]

    def run_generate() -> int:
        # Seeded, so every repeat samples the same rows: its best time and its token count
        # then belong to the same run (its lengths are random draws like renio's, not the same).
        torch.manual_seed(0)
        tokens = 0
        tok.padding_side = "left"
        for b in batches:
            enc = tok.pad({"input_ids": [ids[i] for i, _ in b]}, return_tensors="pt").to(device)
            with torch.no_grad():
                out = model.generate(**enc, do_sample=cfg.temperature > 0,
                                     temperature=cfg.temperature or None,
                                     top_p=cfg.top_p, top_k=cfg.top_k or None,
                                     max_new_tokens=cfg.max_new_tokens, eos_token_id=eos,
                                     pad_token_id=tok.pad_token_id)
            for row in out[:, enc["input_ids"].shape[1]:].tolist():
                n = len(row)
                for j, t in enumerate(row):
                    if t in eos:
                        n = j + 1
                        break
                tokens += n
        return tokens

    samplers = {"fixed": HFSampler(model, tok, refill=False),
                "refill": HFSampler(model, tok, refill=True)}
    lengths: list[int] = []

    def run_renio(kind: str):
        def go() -> int:
            table = samplers[kind].sample(prompts, cfg)
            lens = [len(r) for r in table.column("completion_ids").to_pylist()]
            lengths[:] = lens
            return sum(lens)
        return go

    def timed(fn) -> tuple[float, int]:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        tokens = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0, tokens

    run_generate()  # warm-up
    fns = {"generate": run_generate, "fixed": run_renio("fixed"), "refill": run_renio("refill")}
    best = {k: float("inf") for k in fns}
    toks = {}
    for _ in range(repeats):  # alternate, so a noisy shared machine biases none
        for k, fn in fns.items():
            t, toks[k] = timed(fn)
            best[k] = min(best[k], t)
    rate = {k: toks[k] / best[k] for k in fns}
    print(f"\n[{name}] {len(jobs)} rows, batch {cfg.batch_size}, max {cfg.max_new_tokens} new "
          f"tokens; row lengths min {min(lengths)} / median {statistics.median(lengths):g} / "
          f"max {max(lengths)}; best of {repeats}")
    labels = {"generate": "model.generate", "fixed": "renio, fixed batches",
              "refill": "renio, refilled rows"}
    for k in fns:
        print(f"  {labels[k]:22s}: {toks[k]:7d} tokens in {best[k]:7.2f} s = "
              f"{rate[k]:9.1f} tokens/s  ({rate[k] / rate['generate']:.2f}x generate)")
    print(f"  refill / fixed = {rate['refill'] / rate['fixed']:.2f}")
    return rate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", choices=["fixed", "toy", "reasoning", "all"], default="all")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--n", type=int, default=4, help="samples per prompt in the toy case")
    ap.add_argument("--toy-prompts", type=int, default=32)
    ap.add_argument("--eos-p", type=float, default=1 / 48)
    ap.add_argument("--reasoning-tokens", type=int, default=384)
    ap.add_argument("--vllm", action="store_true", help="also time the vLLM backend")
    ap.add_argument("--vllm-memory", type=float, default=0.2)
    args = ap.parse_args()
    cases = ["fixed", "toy", "reasoning"] if args.case == "all" else [args.case]

    tmp = Path(tempfile.mkdtemp(prefix="bench_rollout_"))
    path = make_model(tmp / "m", hidden=args.hidden, layers=args.layers)
    model = models.load_model(path, dtype="auto")
    tok = models.load_tokenizer(path)
    eos_id = models.eos_token_ids(model, tok)[0]
    device = next(model.parameters()).device
    print(f"device {device}; synthetic model hidden {args.hidden} x {args.layers} layers")
    prompts = [Prompt(id=f"q{i}", problem=f"{100 + 7 * i}+{300 + 13 * i}" * (1 + i % 4))
               for i in range(args.prompts)]
    cfg = RolloutConfig(model=str(path), prompts="-", out="-", n=1, temperature=1.1, top_p=0.95,
                        top_k=20, max_new_tokens=args.new_tokens, batch_size=args.batch)
    if "fixed" in cases:
        handle = set_eos_logit(model, eos_id, None)
        run_case("fixed lengths", model, tok, prompts, cfg, args.repeats)
        handle.remove()
    if "reasoning" in cases:
        handle = set_eos_logit(model, eos_id, math.log(args.eos_p / (1 - args.eos_p)))
        rcfg = dataclasses.replace(cfg, temperature=1.0, top_p=1.0, top_k=0,
                                   max_new_tokens=args.reasoning_tokens)
        run_case(f"reasoning-like lengths, EOS p {args.eos_p:.4f}", model, tok, prompts, rcfg,
                 args.repeats)
        handle.remove()
    if "toy" in cases:
        from renio_core.modeling.toy import ensure_toy_world

        world = ensure_toy_world()
        toy_model = models.load_model(world.student, dtype="auto")
        toy_tok = models.load_tokenizer(world.student)
        toy_prompts = load_prompts(str(world.train_prompts)).prompts[: args.toy_prompts]
        tcfg = dataclasses.replace(cfg, model=str(world.student), n=args.n,
                                   max_new_tokens=args.new_tokens)
        run_case(f"toy world student, {args.n} samples per prompt", toy_model, toy_tok,
                 toy_prompts, tcfg, args.repeats)
    if args.vllm:
        from renio_core.backends.vllm import VllmSampler

        hf = HFSampler(model, tok)
        vsampler = VllmSampler(dataclasses.replace(cfg, vllm_memory=args.vllm_memory), tok)
        try:
            def count(sampler) -> tuple[float, int]:
                t0 = time.perf_counter()
                table = sampler.sample(prompts, cfg)
                return (time.perf_counter() - t0,
                        sum(len(r) for r in table.column("completion_ids").to_pylist()))

            count(vsampler)  # warm-up (graph capture / compilation happen on first use)
            v = min(count(vsampler) for _ in range(args.repeats))
            h = min(count(hf) for _ in range(args.repeats))
        finally:
            vsampler.close()
        print(f"\n[vLLM] {v[1]} tokens in {v[0]:.2f} s = {v[1] / v[0]:.1f} tokens/s; "
              f"HF sampler {h[1] / h[0]:.1f} tokens/s; vLLM / HF = {(v[1] / v[0]) / (h[1] / h[0]):.2f}")


if __name__ == "__main__":
    main()
