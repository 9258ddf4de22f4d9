"""Building the toy world: prompt files, tokenizer, and two tiny Qwen3 models trained here.

The toy world is renio's embedded default (docs/design.md, "Where it runs"): every stage, test
and demo of ReNIO (arXiv 2606.23104) can run on a laptop CPU with no hub access. From a
seed it deterministically writes

    <root>/
      world.json            seed, sizes, model configs, measured accuracies
      train.jsonl           prompts (id, problem, solution, answer, task)
      test.jsonl
      tokenizer/            tokenizer.json, tokenizer_config.json, chat_template.jinja
      teacher/              config.json, generation_config.json, model.safetensors + tokenizer
      student/              the same, smaller

The teacher is trained by supervised fine-tuning on correct solutions until it is nearly
always right, even when sampled at the rollout temperature. The student is smaller and
learns from a sloppy tutor that forgets each carry with probability 0.55, so its own
samples end wrong at a realistic rate and the slip is one token the teacher finds very
unlikely. The student also learns to redo a solution it is shown in OPSD's privileged
prompt (``renio_core.data.prompts.privileged_messages``), so self-distillation has a teacher.

Deliberate differences from the paper: the models are trained from scratch here (the paper
starts from pretrained Qwen3 checkpoints), and the student's errors come from how it was
taught rather than from limited capacity alone.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from renio_core.data.prompts import privileged_messages, render_ids, student_messages
from renio_core.modeling.toy import task as toy_task
from renio_core.modeling.toy.atomic import put_world
from renio_core.modeling.toy.tokenizer import build_tokenizer

Progress = Callable[[str, int, int], None]

N_TRAIN, N_TEST = 1024, 256
# Rollout sampling settings of the official runs (docs/design.md), used to measure accuracy.
ROLLOUT_SAMPLING = {"temperature": 1.1, "top_p": 0.95, "top_k": 20}
# Torch's CPU kernels can sum in a different order with a different thread count; a fixed
# count keeps the weights byte-identical across machines. One thread: the matrices are tiny,
# and on a busy machine (CI, parallel tests) two spinning threads per process ran 15x slower.
BUILD_THREADS = 1


@dataclass(frozen=True)
class ModelSpec:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int


@dataclass(frozen=True)
class TrainSpec:
    steps: int
    batch_size: int
    lr: float
    warmup: int
    # Probability that the tutor forgets an incoming carry, per carry (student only).
    drop_carry: float = 0.0
    # Fraction of examples shown as OPSD privileged prompts with the correct solution.
    privileged_fraction: float = 0.0


TEACHER_MODEL = ModelSpec(128, 4, 4, 2, 32, 384)
STUDENT_MODEL = ModelSpec(96, 3, 4, 2, 24, 256)
TEACHER_TRAIN = TrainSpec(steps=450, batch_size=32, lr=2e-3, warmup=50)
# Dropping 55% of carries puts the fully trained student near 40% correct when sampled
# (E[0.45^carries] over the test split); the privileged prompt is copied after ~500 steps.
STUDENT_TRAIN = TrainSpec(steps=550, batch_size=32, lr=2e-3, warmup=50, drop_carry=0.55,
                          privileged_fraction=0.5)
QUICK_STEPS = 4


@dataclass(frozen=True)
class ToyWorld:
    root: Path
    tokenizer: Path
    teacher: Path
    student: Path
    train_prompts: Path
    test_prompts: Path

    @property
    def manifest(self) -> dict[str, Any]:
        """world.json: seed, sizes, configs, and the accuracies measured at build time."""
        return json.loads((self.root / "world.json").read_text())

    @classmethod
    def at(cls, root: Path) -> ToyWorld:
        root = Path(root)
        return cls(root=root, tokenizer=root / "tokenizer", teacher=root / "teacher",
                   student=root / "student", train_prompts=root / "train.jsonl",
                   test_prompts=root / "test.jsonl")


# ----------------------------------------------------------------------------- data


def _example_ids(tok: Any, p: toy_task.Problem, *, privileged: bool,
                 drop: frozenset[int]) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids incl. EOS) for one training example."""
    if privileged:
        messages = privileged_messages(p.problem, toy_task.solution(p), toy_task.TASK)
    else:
        messages = student_messages(p.problem, toy_task.TASK)
    prompt = render_ids(tok, messages)
    completion = tok(toy_task.solution(p, drop_carries=drop), add_special_tokens=False)["input_ids"]
    return prompt, list(completion) + [tok.eos_token_id]


def _batches(tok: Any, spec: TrainSpec, steps: int, seed: int, name: str,
             exclude: frozenset[toy_task.Problem]):
    """Yield (input_ids_BL, attention_mask_BL, labels_BL); loss only on completion tokens."""
    import torch

    rng = random.Random(f"renio-toy-{name}-{seed}")
    stream = toy_task.random_problems(rng, exclude=exclude)
    for _ in range(steps):
        rows = []
        for _ in range(spec.batch_size):
            p = next(stream)
            privileged = rng.random() < spec.privileged_fraction
            drop = frozenset()
            if not privileged and spec.drop_carry > 0:
                drop = frozenset(c for c in toy_task.carry_columns(p)
                                 if rng.random() < spec.drop_carry)
            rows.append(_example_ids(tok, p, privileged=privileged, drop=drop))
        length = max(len(a) + len(b) for a, b in rows)
        ids_BL = torch.full((len(rows), length), tok.pad_token_id, dtype=torch.long)
        mask_BL = torch.zeros((len(rows), length), dtype=torch.long)
        labels_BL = torch.full((len(rows), length), -100, dtype=torch.long)
        for i, (prompt, completion) in enumerate(rows):
            n = len(prompt) + len(completion)
            ids_BL[i, :n] = torch.tensor(prompt + completion)
            mask_BL[i, :n] = 1
            labels_BL[i, len(prompt):n] = torch.tensor(completion)
        yield ids_BL, mask_BL, labels_BL


# ----------------------------------------------------------------------------- models


def _new_model(spec: ModelSpec, tok: Any, seed: int):
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=len(tok),
        max_position_embeddings=2048,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        bos_token_id=None,
        **asdict(spec),
    )
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.bos_token_id = None
    return model


def fit(model: Any, batches: Iterable[tuple[Any, Any, Any]], *, lr: float, warmup: int,
        steps: int, seed: int, label: str, progress: Progress | None) -> None:
    """Train ``model`` from scratch on ``steps`` batches of (input_ids_BL, attention_mask_BL,
    labels_BL): AdamW, warmup then cosine down to 10%, gradient-norm clip 1. Both toy
    worlds train their models with it."""
    import torch

    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    warmup = min(warmup, max(steps // 4, 1))

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        # Cosine down to 10%: the last steps sharpen the model, which sampling at
        # temperature 1.1 needs.
        frac = (step - warmup) / max(steps - warmup, 1)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    model.train()
    for step, (ids_BL, mask_BL, labels_BL) in enumerate(batches):
        loss = model(input_ids=ids_BL, attention_mask=mask_BL, labels=labels_BL).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if progress is not None:
            progress(label, step + 1, steps)
    model.eval()


def generate_completions(model: Any, tok: Any, prompts: Sequence[list[int]], *, greedy: bool,
                         seed: int, max_new_tokens: int = 48, batch_size: int = 128) -> list[str]:
    """Decoded completions for token-id prompts, greedy or with the rollout's sampling."""
    import torch

    torch.manual_seed(seed)
    out: list[str] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        length = max(len(p) for p in chunk)
        # Left padding, so every row's next token comes right after its prompt.
        ids_BL = torch.full((len(chunk), length), tok.pad_token_id, dtype=torch.long)
        mask_BL = torch.zeros((len(chunk), length), dtype=torch.long)
        for i, p in enumerate(chunk):
            ids_BL[i, length - len(p):] = torch.tensor(p)
            mask_BL[i, length - len(p):] = 1
        kwargs: dict[str, Any] = {"do_sample": False} if greedy else {"do_sample": True,
                                                                      **ROLLOUT_SAMPLING}
        with torch.no_grad():
            gen_BL = model.generate(input_ids=ids_BL, attention_mask=mask_BL,
                                    max_new_tokens=max_new_tokens,
                                    eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                    **kwargs)
        out.extend(tok.decode(row[length:], skip_special_tokens=True) for row in gen_BL)
    return out


def accuracy(model: Any, tok: Any, problems: Sequence[toy_task.Problem], *, greedy: bool,
             privileged: bool = False, seed: int = 0) -> float:
    """Fraction of ``problems`` answered correctly (student or privileged OPSD prompt)."""
    prompts = [render_ids(tok, privileged_messages(p.problem, toy_task.solution(p), toy_task.TASK)
                          if privileged else student_messages(p.problem, toy_task.TASK))
               for p in problems]
    texts = generate_completions(model, tok, prompts, greedy=greedy, seed=seed)
    return sum(toy_task.grade(t, p.answer) for t, p in zip(texts, problems)) / len(problems)


# ----------------------------------------------------------------------------- build


def write_prompt_file(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    """One JSON object per line, keys sorted: the same bytes on every machine."""
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, sort_keys=True) + "\n")


@contextlib.contextmanager
def build_settings() -> Iterator[None]:
    """Every world trains on ``BUILD_THREADS`` threads, without transformers' own progress
    bars (they would interleave with the caller's); both are restored after."""
    import torch
    from transformers.utils import logging as hf_logging

    threads = torch.get_num_threads()
    torch.set_num_threads(BUILD_THREADS)
    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        if bars_were_on:
            hf_logging.enable_progress_bar()


def _save_model(model: Any, tok: Any, out: Path) -> None:
    model.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))


def build_toy_world(out_dir: str | os.PathLike[str], *, seed: int = 0, quick: bool = False,
                    progress: Progress | None = None) -> ToyWorld:
    """Build the toy world into ``out_dir`` (created; existing files are overwritten).

    ``quick`` trains a few steps only and skips the accuracy measurements: same files, in
    seconds, for tests that need real models but not good ones.
    """
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    world = ToyWorld.at(root)
    with build_settings():
        train, test = toy_task.split_problems(seed, N_TRAIN, N_TEST)
        write_prompt_file(world.train_prompts, (toy_task.prompt_row(p) for p in train))
        write_prompt_file(world.test_prompts, (toy_task.prompt_row(p) for p in test))
        tok = build_tokenizer()
        tok.save_pretrained(str(world.tokenizer))
        # The test problems never appear in training; train prompts may (they are the
        # prompts of on-policy distillation, which the student has seen too in real runs).
        exclude = frozenset(test)
        models = {}
        for name, mspec, tspec, mseed in (("teacher", TEACHER_MODEL, TEACHER_TRAIN, seed),
                                          ("student", STUDENT_MODEL, STUDENT_TRAIN, seed + 1)):
            steps = QUICK_STEPS if quick else tspec.steps
            model = _new_model(mspec, tok, mseed)
            fit(model, _batches(tok, tspec, steps, mseed, name, exclude), lr=tspec.lr,
                warmup=tspec.warmup, steps=steps, seed=mseed, label=f"train {name}",
                progress=progress)
            _save_model(model, tok, getattr(world, name))
            models[name] = model
        metrics: dict[str, float] = {}
        if not quick:
            metrics = measure_accuracies(models["teacher"], models["student"], tok, test,
                                         seed=seed, progress=progress)
        manifest = {
            "seed": seed,
            "quick": quick,
            "task": "3-digit column addition, one step per column, answer in \\boxed{}",
            "n_train": len(train),
            "n_test": len(test),
            "teacher": {"model": asdict(TEACHER_MODEL),
                        "train": asdict(TEACHER_TRAIN) | {"steps": QUICK_STEPS if quick else TEACHER_TRAIN.steps}},
            "student": {"model": asdict(STUDENT_MODEL),
                        "train": asdict(STUDENT_TRAIN) | {"steps": QUICK_STEPS if quick else STUDENT_TRAIN.steps}},
            "sampling": ROLLOUT_SAMPLING,
            "accuracy": metrics,
        }
        (root / "world.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return world


def measure_accuracies(teacher: Any, student: Any, tok: Any,
                       problems: Sequence[toy_task.Problem], *, seed: int = 0,
                       progress: Progress | None = None) -> dict[str, float]:
    """The four accuracies the toy world promises, on ``problems``."""
    runs = (("teacher_greedy", teacher, True, False),
            ("teacher_sampled", teacher, False, False),
            ("student_sampled", student, False, False),
            ("student_privileged_sampled", student, False, True))
    out = {}
    for i, (key, model, greedy, privileged) in enumerate(runs):
        out[key] = accuracy(model, tok, problems, greedy=greedy, privileged=privileged,
                            seed=seed + i)
        if progress is not None:
            progress("measure accuracy", i + 1, len(runs))
    return out


# ----------------------------------------------------------------------------- cache

DEFAULT_CACHE = Path("~/.cache/renio/toy")
TOY_NAMES = {"toy:teacher": "teacher", "toy:student": "student", "toy:tokenizer": "tokenizer"}


def _source_digest() -> str:
    """Changes whenever the code that determines the world's bytes changes."""
    here = Path(__file__).parent
    h = hashlib.sha256()
    for name in ("task.py", "tokenizer.py", "build.py"):
        h.update((here / name).read_bytes())
    return h.hexdigest()[:12]


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """``cache_dir``, else env RENIO_TOY_CACHE, else ~/.cache/renio/toy."""
    if cache_dir is None:
        cache_dir = os.environ.get("RENIO_TOY_CACHE") or DEFAULT_CACHE
    return Path(cache_dir).expanduser()


def ensure_toy_world(cache_dir: str | os.PathLike[str] | None = None, *, seed: int = 0,
                     progress: Progress | None = None) -> ToyWorld:
    """The cached addition world for ``seed``, built first if missing (``ensure_world``)."""
    return ensure_world(cache_root(cache_dir), f"seed{seed}-{_source_digest()}", build_toy_world,
                        seed=seed, progress=progress)


def ensure_world(base: Path, name: str, builder: Callable[..., ToyWorld], *, seed: int = 0,
                 progress: Progress | None = None) -> ToyWorld:
    """The cached world ``base/name``, built first by ``builder`` if missing; concurrent
    callers wait for one build (``atomic.put_world``). Every toy world's cache goes through
    here."""
    put_world(base / name, lambda tmp: builder(tmp, seed=seed, progress=progress), reuse=True)
    return ToyWorld.at(base / name)


def resolve_model(name: str, cache_dir: str | os.PathLike[str] | None = None) -> str:
    """``toy:teacher`` / ``toy:student`` / ``toy:tokenizer`` -> a local path; else ``name``."""
    if name in TOY_NAMES:
        world = ensure_toy_world(cache_dir)
        return str(getattr(world, TOY_NAMES[name]))
    return name
