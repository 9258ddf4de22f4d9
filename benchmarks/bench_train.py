"""Benchmark of one ``renio train`` loss step: chunked LM head vs naive full-vocabulary logits.

    .venv/bin/python benchmarks/bench_train.py            # toy model + synthetic 150k vocab
    .venv/bin/python benchmarks/bench_train.py --quick    # smaller shapes, seconds

For each model it times forward + backward of one micro-batch of the ``jsd`` loss (OPD: a
separate teacher, LoRA student), both ways, in the same process:

* ``chunked``: ``DistillModule`` (renio_core.stages.train) — decoder once, then the LM head and
  the divergence on completion positions only, ``--chunk`` positions at a time, gradients
  computed chunk by chunk;
* ``naive``: ``naive_loss`` — the model's full ``batch x length x vocabulary`` logits for
  student and teacher, then ``token_divergence`` and ``weighted_loss`` on them.

``--live`` times instead the chunked step with live ReNIO weights (``train.weights_from: live``,
``renio run``'s score_in_train_step), both ways, in the same process: the sampled-token
log-probs taken from the loss pass's own chunks (what a frozen head, LoRA, runs) against a
log-prob pass over both heads before the loss (what a trained head runs), in two alternating
rounds (median); ratio pass-first / one-pass.

Peak memory is the extra resident memory of the step: on a GPU ``max_memory_allocated``; on a
CPU the kernel's peak-RSS counter (VmHWM), reset before each variant through
``/proc/self/clear_refs``, with glibc's mmap threshold fixed so that freed tensors leave RSS. It prints the times, the peaks, and the ratios naive / chunked.
Both variants compute the same loss; the script checks that too.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from renio_core.training.data import LiveWeightSpec, MicroBatch, pack  # noqa: E402
from renio_core.training.losses import LossSpec  # noqa: E402
from renio_core.training.module import DistillModule, naive_loss  # noqa: E402


class LogprobPassFirst(DistillModule):
    """Live weights from a log-prob pass before the loss, even for a frozen head: the baseline
    of ``--live``."""

    def _live(self, p, hidden_NH, lm, teacher):
        return self._live_coef(p, hidden_NH, lm, teacher)

# --------------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------------


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


class PeakMemory:
    """Extra peak memory (bytes) of the code inside ``with`` over the memory at entry."""

    def __init__(self, device: torch.device):
        self.device = device
        self.extra = 0

    def __enter__(self) -> PeakMemory:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")  # reset VmHWM to the current RSS
            self.base = _rss_kib("VmRSS") * 1024
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.extra = torch.cuda.max_memory_allocated() - self.base
        else:
            self.extra = _rss_kib("VmHWM") * 1024 - self.base


# --------------------------------------------------------------------------------------------
# Models and batches
# --------------------------------------------------------------------------------------------


def _qwen3(vocab: int, hidden: int, layers: int, seed: int):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen3Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 3,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=hidden // 4, max_position_embeddings=4096,
                      tie_word_embeddings=False)
    return Qwen3ForCausalLM(cfg)


def toy_models(workdir: Path):
    """The toy world's teacher and student: the cached world if built, else a quick build (same
    architectures; only the architecture matters for time and memory)."""
    from renio_core.modeling import models
    from renio_core.modeling.toy import ToyWorld, build_toy_world, cache_root

    cached = sorted(cache_root().glob("seed0-*/world.json"))
    world = ToyWorld.at(cached[-1].parent) if cached else build_toy_world(workdir / "toy", quick=True)
    student = models.load_model(world.student, dtype="float32", device="cpu")
    teacher = models.load_model(world.teacher, dtype="float32", device="cpu")
    return student, teacher


def with_lora(model):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    lcfg = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                      "up_proj", "down_proj"])
    peft_model = get_peft_model(model, lcfg)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)
    peft_model.train()
    return peft_model


def micro_batch(vocab: int, batch: int, prompt_len: int, completion_len: int, seed: int) -> MicroBatch:
    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(0, vocab, (batch, prompt_len), generator=g).tolist()
    step = completion_len // (2 * batch)
    comps = [torch.randint(0, vocab, (completion_len - step * i,), generator=g).tolist()
             for i in range(batch)]  # ragged, as real completions are
    return MicroBatch(
        batch_id=0, prompt_ids=prompts, completion_ids=comps, teacher_prompt_ids=prompts,
        teacher_logprobs=[[-1.0] * len(c) for c in comps],
        weights=[1.0 + 0.25 * i for i in range(batch)], pivotal_count=[0] * batch,
    )


# --------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------


def measure(module: DistillModule, packed, naive: bool, steps: int, device: torch.device):
    def step() -> float:
        module.zero_grad(set_to_none=True)
        loss = naive_loss(module, packed) if naive else module(packed)[0]
        loss.backward()
        return float(loss.detach())

    value = step()  # warm-up (allocator, kernels)
    module.zero_grad(set_to_none=True)
    times = []
    with PeakMemory(device) as mem:
        for _ in range(steps):
            t0 = time.perf_counter()
            step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    module.zero_grad(set_to_none=True)
    return statistics.median(times), mem.extra, value


def run_case(name: str, student, teacher, mb: MicroBatch, chunk: int, steps: int,
             device: torch.device) -> dict:
    student = with_lora(student).to(device)
    teacher = teacher.to(device).eval().requires_grad_(False)
    module = DistillModule(student, LossSpec("jsd", 0.0, 0.05, 1.1), chunk, teacher=teacher)
    packed = pack(mb, 0, device)
    t_c, m_c, v_c = measure(module, packed, naive=False, steps=steps, device=device)
    t_n, m_n, v_n = measure(module, packed, naive=True, steps=steps, device=device)
    if abs(v_c - v_n) > 1e-4 * max(1.0, abs(v_n)):
        raise SystemExit(f"{name}: chunked loss {v_c} != naive loss {v_n}")
    vocab = student.get_output_embeddings().weight.shape[0]
    return {"case": name, "vocab": vocab, "tokens": sum(len(c) for c in mb.completion_ids),
            "batch": len(mb.completion_ids), "chunked_s": t_c, "naive_s": t_n,
            "chunked_mb": m_c / 2**20, "naive_mb": m_n / 2**20}


def run_live_case(name: str, student, teacher, mb: MicroBatch, chunk: int, steps: int,
                  device: torch.device) -> dict:
    student = with_lora(student).to(device)
    teacher = teacher.to(device).eval().requires_grad_(False)
    mb.teacher_logprobs = None  # the teacher's come from the step, as in score_in_train_step
    packed = pack(mb, 0, device)
    live = LiveWeightSpec(2.0, 1.0, 1.0, "batch_mean", "renio")
    row = {"case": name, "vocab": student.get_output_embeddings().weight.shape[0],
           "tokens": sum(len(c) for c in mb.completion_ids), "batch": len(mb.completion_ids)}
    times: dict[str, list[float]] = {"one_pass": [], "pass_first": []}
    for _ in range(2):  # alternating, so that a change of load falls on both
        for key, cls in (("one_pass", DistillModule), ("pass_first", LogprobPassFirst)):
            module = cls(student, LossSpec("jsd", 0.0, 0.05, 1.1), chunk, teacher=teacher,
                         live=live)
            t, peak, row[f"{key}_loss"] = measure(module, packed, naive=False, steps=steps,
                                                  device=device)
            times[key].append(t)
            row[f"{key}_mb"] = max(row.get(f"{key}_mb", 0.0), peak / 2**20)
            row[f"{key}_weights"] = module.last_live[0]
    for key, ts in times.items():
        row[f"{key}_s"] = statistics.median(ts)
    if (abs(row["one_pass_loss"] - row["pass_first_loss"]) > 1e-5 * max(1.0, abs(row["one_pass_loss"]))
            or (row["one_pass_weights"] != row["pass_first_weights"]).any()):
        raise SystemExit(f"{name}: the two live paths disagree")
    return row


def print_table(rows: list[dict], new: str, base: str, note: str) -> None:
    """One line per case: the times and peaks of the row keys ``new`` and ``base`` (``chunked``
    against ``naive``, ``one_pass`` against ``pass_first``), with the ratios base / new."""
    n, b = new.replace("_", " "), base.replace("_", " ")
    header = (f"{'case':44s} {'V':>7s} {'B x tok':>9s} {n + ' s':>12s} {b + ' s':>12s} "
              f"{'time ratio':>10s} {n + ' MiB':>14s} {b + ' MiB':>14s} {'mem ratio':>9s}")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['case']:44s} {r['vocab']:7d} {r['batch']:>3d} x {r['tokens']:<4d} "
              f"{r[new + '_s']:12.3f} {r[base + '_s']:12.3f} {r[base + '_s'] / r[new + '_s']:9.2f}x "
              f"{r[new + '_mb']:14.1f} {r[base + '_mb']:14.1f} "
              f"{r[base + '_mb'] / max(r[new + '_mb'], 1e-9):8.2f}x")
    print(note)


def main() -> None:
    if not torch.cuda.is_available() and "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        # glibc keeps freed heap memory and raises its mmap threshold as big blocks come and
        # go, so RSS would not show a step's peak. A fixed threshold makes every large tensor
        # its own mapping, returned on free: RSS then follows the live tensors.
        os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
        os.execv(sys.executable, [sys.executable, *sys.argv])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small shapes (a smoke run)")
    ap.add_argument("--live", action="store_true",
                    help="live weights: one pass against a log-prob pass first")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per variant (median)")
    ap.add_argument("--chunk", type=int, default=128, help="positions per LM-head chunk")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    ap.add_argument("--vocab", type=int, default=151936, help="vocabulary of the synthetic model")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--completion", type=int, default=384)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.quick:
        args.vocab, args.batch, args.completion, args.steps = 32768, 2, 96, 2

    case = run_live_case if args.live else run_case
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        student, teacher = toy_models(Path(tmp))
        vocab = student.get_output_embeddings().weight.shape[0]
        mb = micro_batch(vocab, 8, 20, 48, seed=0)
        rows.append(case("toy world (hidden 96/128, char vocab)", student, teacher, mb,
                         args.chunk, args.steps, device))
    del student, teacher
    gc.collect()
    student = _qwen3(args.vocab, 256, 2, seed=1)
    teacher = _qwen3(args.vocab, 256, 2, seed=2)
    mb = micro_batch(args.vocab, args.batch, 32, args.completion, seed=1)
    rows.append(case(f"synthetic Qwen3, vocab {args.vocab}", student, teacher, mb,
                     args.chunk, args.steps, device))
    if args.live:
        print(f"device: {device}, torch threads: {torch.get_num_threads()}, chunk: {args.chunk}, "
              f"loss: jsd beta 0 clip 0.05, LoRA r 8 student, separate teacher, live weights")
        return print_table(rows, "one_pass", "pass_first", "ratios are pass first / one "
                           "pass: above 1 means the one-pass step is faster or smaller.")
    print(f"device: {device}, torch threads: {torch.get_num_threads()}, chunk: {args.chunk}, "
          f"loss: jsd beta 0 clip 0.05, LoRA r 8 student, separate teacher")
    print_table(rows, "chunked", "naive", "ratios are naive / chunked: above 1 means the chunked "
                "path is faster or smaller.")


if __name__ == "__main__":
    main()
