"""renio against TRL's on-policy distillation trainer, side by side, on this machine.

    pip install -e ".[bench]"
    python benchmarks/bench_peer.py [--case 1 2] [--repeats 3] [--steps 6 3] [--device cuda]

Both systems get the same models, prompts, batch, lengths and sampling: 8 prompts per
optimizer step, one sample each, T 1.1 / top-p 0.95 / top-k 20, forward KL (beta 0) against
the teacher's full logits, LoRA r 16 (alpha 32) on all attention and MLP projections,
AdamW at lr 1e-4, constant schedule. TRL runs ``trl.DistillationTrainer`` (on-policy:
every step samples from the current student); renio runs ``renio run`` with one
optimizer step per fresh rollout batch (``train.steps_per_batch: 1``), still writing the
rollouts, scores and weights shards, ReNIO-weighted (weights computed in the train step,
``train.weights_from: live``).

Models (random weights, Qwen3 architecture, built here; the toy world's own models are
smaller, 96 x 3 and 128 x 4): student hidden 128 x 2 layers, teacher 256 x 4, on the toy
world's character tokenizer and addition prompts.

* case 1: the toy world's 110-token vocabulary, 64 new tokens;
* case 2: the same models given Qwen3's 151,936-token vocabulary and 256 new tokens, so the
  full-vocabulary divergence dominates.

``--device cuda`` runs both on the GPU, in float32 as on the CPU, and adds each child's peak
GPU memory (``torch.cuda.max_memory_allocated``).

Each run is a fresh subprocess, alternating TRL, renio, TRL, renio, ... Its peak memory is
its own high-water mark, ``VmHWM`` of ``/proc/self/status`` read in the child: ``ru_maxrss``
would not do, as Linux carries the parent's high-water mark (this process has imported torch
and built the models) across ``fork`` and ``exec`` into the child's. The time per optimizer step leaves out the first step (warm-up). The
last lines print renio / TRL with min / median / max over the repeats, and ``uptime``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPTS_PER_STEP = 8
SAMPLING = dict(temperature=1.1, top_p=0.95, top_k=20)
LORA_R, LORA_ALPHA, LR = 16, 32, 1e-4
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CASES = {1: dict(vocab=None, new_tokens=64), 2: dict(vocab=151_936, new_tokens=256)}
# (hidden, layers, heads, kv heads, head dim, intermediate)
STUDENT, TEACHER = (128, 2, 4, 2, 32, 384), (256, 4, 4, 2, 64, 768)


def build_models(out: Path, vocab: int | None) -> tuple[Path, Path, list[str]]:
    """Random Qwen3 student and teacher on the toy tokenizer; returns their dirs and problems."""
    import torch
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    from renio_core.modeling.toy import ToyWorld, build_toy_world, cache_root

    # Only the tokenizer and the prompts are used, which a quick build has too.
    cached = sorted(cache_root().glob("seed0-*/world.json"))
    world = ToyWorld.at(cached[-1].parent) if cached else build_toy_world(out / "toy", quick=True)
    tok = AutoTokenizer.from_pretrained(world.tokenizer)
    dirs = []
    for name, (h, n_layers, heads, kv, hd, inter) in (("student", STUDENT), ("teacher", TEACHER)):
        torch.manual_seed(1 if name == "student" else 2)
        cfg = Qwen3Config(vocab_size=vocab or len(tok), hidden_size=h, num_hidden_layers=n_layers,
                          num_attention_heads=heads, num_key_value_heads=kv, head_dim=hd,
                          intermediate_size=inter, max_position_embeddings=2048,
                          tie_word_embeddings=True, pad_token_id=tok.pad_token_id,
                          eos_token_id=tok.eos_token_id, bos_token_id=None)
        d = out / name
        Qwen3ForCausalLM(cfg).save_pretrained(d)
        tok.save_pretrained(d)
        dirs.append(d)
    problems = [json.loads(x)["problem"] for x in world.train_prompts.read_text().splitlines()]
    return dirs[0], dirs[1], problems


def child_trl(a: argparse.Namespace) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DistillationConfig, DistillationTrainer

    from renio_core.data.prompts import student_messages

    torch.manual_seed(0)
    problems = json.loads(Path(a.problems).read_text())
    n = PROMPTS_PER_STEP * a.steps
    ds = Dataset.from_list([{"prompt": student_messages(p)} for p in problems[:n]])
    tok = AutoTokenizer.from_pretrained(a.student)
    student = AutoModelForCausalLM.from_pretrained(a.student, dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(a.teacher, dtype=torch.float32)
    args = DistillationConfig(
        output_dir=str(Path(a.work) / "trl"), per_device_train_batch_size=PROMPTS_PER_STEP,
        gradient_accumulation_steps=1, max_steps=a.steps, learning_rate=LR,
        lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0, beta=0.0,
        max_completion_length=a.new_tokens, temperature=SAMPLING["temperature"],
        top_p=SAMPLING["top_p"], top_k=SAMPLING["top_k"], save_strategy="no", report_to=[],
        logging_steps=1, use_cpu=a.device == "cpu", bf16=False, seed=0, shuffle_dataset=False,
        dataloader_num_workers=0)
    step_ends: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):  # noqa: ARG002
            if not step_ends:
                step_ends.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):  # noqa: ARG002
            step_ends.append(time.perf_counter())

    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=args, train_dataset=ds, processing_class=tok,
        peft_config=LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0,
                               target_modules=TARGETS, task_type="CAUSAL_LM"),
        callbacks=[Clock()])
    trainer.train()
    steps = [b - a_ for a_, b in zip(step_ends, step_ends[1:])]
    return {"step_seconds": steps}


def child_renio(a: argparse.Namespace) -> dict:
    from renio_core.run.config import load_run_config
    from renio_core.run.loop import run_loop

    problems = json.loads(Path(a.problems).read_text())
    prompts = Path(a.work) / "prompts.jsonl"
    # No answers: TRL's side grades nothing, so renio's rollouts are not graded either.
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "problem": p, "task": "math"}) + "\n"
                               for i, p in enumerate(problems[:PROMPTS_PER_STEP * a.steps])))
    run_dir = Path(a.work) / "run"
    cfg = load_run_config(ROOT / "sample_configs" / "toy-opd-renio.yaml", [
        f"run_dir={run_dir}", f"student={a.student}", f"teacher={a.teacher}",
        f"prompts={prompts}", "eval_prompts=null", "eval_every=0", f"iterations={a.steps}",
        f"prompts_per_iteration={PROMPTS_PER_STEP}", "rollout.n=1",
        f"rollout.max_new_tokens={a.new_tokens}", f"rollout.batch_size={PROMPTS_PER_STEP}",
        f"weight.group_size={PROMPTS_PER_STEP}", "train.steps_per_batch=1",
        "score_in_train_step=true", "train.weights_from=live", "train.token_clip=0.0",
        f"train.lora_r={LORA_R}",
        f"train.lora_alpha={LORA_ALPHA}", f"train.lr={LR}", "train.lr_schedule=constant",
        "train.dtype=float32", f"rollout.device={a.device}", f"score.device={a.device}",
        f"train.device={a.device}"])
    # Wall time from one iteration's end to the next (its metrics line written and older
    # iterations pruned), as TRL's side is timed from one step's end to the next.
    from renio_core.run import loop as loop_module

    ends = [time.perf_counter()]
    prune = loop_module._Loop.prune

    def timed_prune(self, newest: int, keep: int | None = None) -> None:
        prune(self, newest, keep)
        ends.append(time.perf_counter())

    loop_module._Loop.prune = timed_prune
    run_loop(cfg)
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {"step_seconds": [b - a_ for a_, b in zip(ends, ends[1:])],
            "time": [r["time"] for r in records]}


def own_peak_mib() -> float:
    """This process's peak resident memory in MiB, counted from its own ``exec``."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024  # the kernel writes kB (KiB)
    raise RuntimeError("/proc/self/status has no VmHWM line (not Linux?)")


def child(a: argparse.Namespace) -> None:
    result = (child_trl if a.child == "trl" else child_renio)(a)
    result["peak_rss_mb"] = own_peak_mib()
    if a.device == "cuda":
        import torch

        result["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    Path(a.result).write_text(json.dumps(result))


def run_child(system: str, student: Path, teacher: Path, problems: Path, work: Path,
              steps: int, new_tokens: int, device: str) -> dict:
    work.mkdir(parents=True)
    result = work / "result.json"
    cmd = [sys.executable, __file__, "--child", system, "--student", str(student),
           "--teacher", str(teacher), "--problems", str(problems), "--work", str(work),
           "--child-steps", str(steps), "--new-tokens", str(new_tokens), "--result", str(result),
           "--device", device]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{system} failed:\n{proc.stderr[-4000:]}")
    return json.loads(result.read_text())


def spread(xs: list[float]) -> str:
    return f"{min(xs):.3f} / {statistics.median(xs):.3f} / {max(xs):.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", type=int, nargs="+", default=[1, 2], choices=[1, 2])
    ap.add_argument("--repeats", type=int, default=3, help="alternating runs of each system")
    ap.add_argument("--steps", type=int, nargs=2, default=[6, 3], metavar=("CASE1", "CASE2"),
                    help="optimizer steps per run (the first is warm-up, left out of the time)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                    help="where both systems run (default cpu)")
    for flag in ("--child", "--student", "--teacher", "--problems", "--work", "--result"):
        ap.add_argument(flag, help=argparse.SUPPRESS)
    ap.add_argument("--new-tokens", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--child-steps", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        a.steps = a.child_steps
        return child(a)
    if a.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            sys.exit("--device cuda: torch sees no CUDA device")
        print(f"device: {torch.cuda.get_device_name(0)}")
    print(f"uptime at start: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")
    for case in a.case:
        spec, steps = CASES[case], a.steps[case - 1]
        with tempfile.TemporaryDirectory() as tmp:
            student, teacher, problems = build_models(Path(tmp) / "models", spec["vocab"])
            pfile = Path(tmp) / "problems.json"
            pfile.write_text(json.dumps(problems))
            res: dict[str, list[dict]] = {"trl": [], "renio": []}
            for rep in range(a.repeats):
                for system in ("trl", "renio"):
                    r = run_child(system, student, teacher, pfile, Path(tmp) / f"{system}{rep}",
                                  steps, spec["new_tokens"], a.device)
                    r["per_step"] = statistics.mean(r["step_seconds"][1:] or r["step_seconds"])
                    res[system].append(r)
                    print(f"case {case} rep {rep} {system:>5}: {r['per_step']:.3f} s/step, "
                          f"peak RSS {r['peak_rss_mb']:.0f} MiB"
                          + (f", peak GPU {r['peak_gpu_mib']:.0f} MiB" if "peak_gpu_mib" in r
                             else ""), flush=True)
        vocab = spec["vocab"] or "toy (110)"
        print(f"\ncase {case}: vocab {vocab}, {PROMPTS_PER_STEP} prompts x {spec['new_tokens']} "
              f"new tokens, {steps} steps/run, {a.repeats} runs each (min / median / max)")
        for system in ("trl", "renio"):
            print(f"  {system:>5}: s/step {spread([r['per_step'] for r in res[system]])}, "
                  f"peak RSS MiB {spread([r['peak_rss_mb'] for r in res[system]])}")
        t_ratio = [r["per_step"] / t["per_step"] for r, t in zip(res["renio"], res["trl"])]
        m_ratio = [r["peak_rss_mb"] / t["peak_rss_mb"] for r, t in zip(res["renio"], res["trl"])]
        print(f"  renio/TRL time per step {spread(t_ratio)}; peak RSS {spread(m_ratio)}")
        if a.device == "cuda":
            g_ratio = [r["peak_gpu_mib"] / t["peak_gpu_mib"]
                       for r, t in zip(res["renio"], res["trl"])]
            print(f"  peak GPU MiB: TRL {spread([t['peak_gpu_mib'] for t in res['trl']])}, "
                  f"renio {spread([r['peak_gpu_mib'] for r in res['renio']])}; "
                  f"renio/TRL {spread(g_ratio)}")
        split = [t for r in res["renio"] for t in r["time"][1:]]
        if split:
            keys = [k for k in split[0] if not k.endswith("_work") and k != "train_steps"]
            print("  renio split (mean s): " + ", ".join(
                f"{k} {statistics.mean(t[k] for t in split):.3f}" for k in keys))
    print(f"uptime at end: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")


if __name__ == "__main__":
    main()
