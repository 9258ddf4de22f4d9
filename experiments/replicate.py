"""The toy replication of the paper's comparisons, on both toy worlds, in one command.

    python experiments/replicate.py [--seeds 0 1 2 3 4] [--jobs 2] [--out runs/replication]

Worlds: ``addition`` (3-digit column addition, ``toy:*``; every error is a dropped carry and
the teacher offers no way back) and ``chain`` (K dependent mod-10 steps, ``toy-chain:*``; the
teacher checks each line and, after a wrong one, writes ``wait`` and the redo). Every run is
the real CLI (``renio run``) with the faithful loop of ``sample_configs/toy-*.yaml``: 64
iterations, each one optimizer step on a fresh batch of 32 prompts x 1 sample, one AdamW and
a linear schedule over the run, evaluated every ``EVAL_EVERY`` iterations. Conditions:

    opd                 plain OPD (every sample weighs 1)             toy-opd.yaml
    opd-renio           OPD + ReNIO weights                           toy-opd-renio.yaml
    opsd                plain OPSD (teacher: self + privileged)       toy-opsd.yaml
    opsd-renio          OPSD + ReNIO weights                          toy-opsd-renio.yaml
    opd-correct-only    OPD on correct samples only, at equal rows    weight.filter=correct
    opd-incorrect-only  OPD on incorrect samples only, at equal rows  weight.filter=incorrect
    opd-tclip0.05       opd with the official token clip 0.05         train.token_clip=0.05
    opd-renio-tclip0.05 opd-renio with the official token clip 0.05   train.token_clip=0.05

(The sample configs use token clip 0, so ``opd`` and ``opd-renio`` are the clip-0 runs.) The
filtered runs use ``fill_filtered``: each iteration samples further prompts until it has 32
rows of the kept kind, so they take as many rows and optimizer steps as the others.

Conditions, seeds and hyperparameters are fixed here before the first run. A run directory
carries ``replicate-stamp.json``: the run's full config (YAML file, overrides, seed) and a
digest of the code that made it; a finished run is reused only when both match, and a
directory made with another config or code version is refused, naming the difference,
unless ``--rerun-stale`` is given. Every (world, condition, replicate) gets its own run seed,
spaced so that no seed derived from it inside ``renio run`` equals one of another run
(``run_seed``). Differences are paired by replicate and judged with a two-sided t test at 95%
(t quantile for n - 1 degrees of freedom, computed exactly); with fewer than ``MIN_SEEDS``
replicates the verdict is "undetermined". After ``--seeds``, every comparison whose paired
standard error is larger than its effect gets ``--more-seeds`` (5) further replicates of both
its conditions, once.

Results: ``docs/replication.md`` (tables per world, paired tests, the behaviour analysis:
completion length and reflection-marker rate after correct-only and incorrect-only training,
accuracy by chain length K) and its plots; raw numbers in ``OUT/results.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
CONDITIONS = {
    "opd": ("toy-opd.yaml", []),
    "opd-renio": ("toy-opd-renio.yaml", []),
    "opsd": ("toy-opsd.yaml", []),
    "opsd-renio": ("toy-opsd-renio.yaml", []),
    "opd-correct-only": ("toy-opd.yaml", ["weight.filter=correct", "fill_filtered=true"]),
    "opd-incorrect-only": ("toy-opd.yaml", ["weight.filter=incorrect", "fill_filtered=true"]),
    "opd-tclip0.05": ("toy-opd.yaml", ["train.token_clip=0.05"]),
    "opd-renio-tclip0.05": ("toy-opd-renio.yaml", ["train.token_clip=0.05"]),
}
EVAL_EVERY = 8
COMMON = [f"eval_every={EVAL_EVERY}"]
CHAIN_MAX_NEW = 128  # renio_core.modeling.toy.chain.MAX_NEW_TOKENS: the world's own setting
WORLDS = {
    # The sample configs are the addition world's; nothing to change.
    "addition": {"models": [], "prompts": []},
    "chain": {"models": ["student=toy-chain:student", "teacher=toy-chain:teacher"],
              "prompts": ["prompts=toy-chain:train", "eval_prompts=toy-chain:test",
                          f"rollout.max_new_tokens={CHAIN_MAX_NEW}",
                          f"eval.max_new_tokens={CHAIN_MAX_NEW}", "eval.limit=256"]},
}
# Fixed slot per (world, condition) for seed derivation; append new ones, never reorder.
WORLD_SLOT = {name: i for i, name in enumerate(WORLDS)}
CONDITION_SLOT = {name: i for i, name in enumerate(CONDITIONS)}
SLOTS_PER_WORLD = 16
MAX_SLOTS = 64
# renio run derives, from its seed s: rollout s * 100003 + it, train s * 100003 + it, eval
# s + 7919 (renio_core/stages/run_loop.py). A stride larger than 7919 + iterations keeps the
# ranges of different runs apart (tests/test_replicate.py checks it, modulo 2**32 where a
# generator truncates).
SEED_STRIDE = 10_000
MIN_SEEDS = 3
STAMP = "replicate-stamp.json"
PAIRS = (  # (baseline, treatment, what a positive difference means, negative)
    ("opd", "opd-renio", "ReNIO helps", "ReNIO hurts"),
    ("opsd", "opsd-renio", "ReNIO helps", "ReNIO hurts"),
    ("opd-tclip0.05", "opd-renio-tclip0.05", "ReNIO helps", "ReNIO hurts"),
    ("opd", "opd-tclip0.05", "token clip 0.05 helps", "token clip 0.05 hurts"),
    ("opd-correct-only", "opd-incorrect-only", "incorrect-only is better",
     "correct-only is better"),
)


def run_seed(world: str, name: str, replicate: int) -> int:
    """The ``seed`` given to ``renio run`` for one (world, condition, replicate): unique."""
    if replicate < 0:
        raise ValueError(f"replicate must be >= 0, got {replicate}")
    slot = WORLD_SLOT[world] * SLOTS_PER_WORLD + CONDITION_SLOT[name]
    return (replicate * MAX_SLOTS + slot + 1) * SEED_STRIDE


def derived_seeds(seed: int, iterations: int) -> set[tuple[str, int]]:
    """The seeds ``renio run`` derives from ``seed``, as the generators see them: rollout rows
    hash the full rollout seed (``formulas.sampling.row_seed``); torch's and numpy's generators
    (train, and the eval's seed) keep only its low 32 bits."""
    out = {("torch", (seed + 7919) % 2**32)}
    for it in range(iterations):
        out.add(("rollout", seed * 100003 + it))
        out.add(("torch", (seed * 100003 + it) % 2**32))
    return out


def code_version() -> str:
    """Digest of the code that decides a run's outcome: renio_core and renio_cli. The run's
    config file is in its stamp as text (``config_text``), so another YAML file added to
    ``sample_configs`` leaves every run current."""
    h = hashlib.sha256()
    for sub in ("renio_core", "renio_cli"):
        for path in sorted((ROOT / sub).rglob("*")):
            if path.suffix in (".py", ".yaml", ".jinja") and path.is_file():
                h.update(str(path.relative_to(ROOT)).encode() + b"\0")
                h.update(path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def run_overrides(world: str, name: str) -> list[str]:
    """The ``key=value`` overrides of one run (besides run_dir and seed)."""
    config, extra = CONDITIONS[name]
    w = WORLDS[world]
    models = w["models"]
    if "opsd" in config:  # OPSD's teacher is the student itself: only the student changes
        models = [m for m in models if not m.startswith("teacher=")]
    return [*models, *w["prompts"], *COMMON, *extra]


def run_stamp(world: str, name: str, replicate: int, code: str) -> dict:
    """What a run directory must have been made with to be reused."""
    config, _ = CONDITIONS[name]
    return {"world": world, "condition": name, "replicate": replicate,
            "seed": run_seed(world, name, replicate), "config_file": config,
            "config_text": (ROOT / "sample_configs" / config).read_text(),
            "overrides": run_overrides(world, name), "code_version": code}


class StaleRun(Exception):
    """A run directory made with another config or code version."""


def stamp_differences(found: dict, wanted: dict) -> list[str]:
    return [f"{key}: on disk {found.get(key)!r}, now {wanted.get(key)!r}"
            for key in sorted(set(found) | set(wanted)) if found.get(key) != wanted.get(key)]


def reuse_decision(run_dir: Path, stamp: dict, *, rerun_stale: bool = False) -> str:
    """"reuse" (finished, same stamp), "run" (absent, or unfinished with the same stamp), or
    raise StaleRun naming the difference; with ``rerun_stale`` a stale directory is deleted
    and "run" returned."""
    if not run_dir.exists():
        return "run"
    stamp_path = run_dir / STAMP
    if stamp_path.is_file():
        problems = stamp_differences(json.loads(stamp_path.read_text()), stamp)
    else:
        problems = [f"no {STAMP} (made by an older replicate.py or another tool)"]
    if problems:
        if not rerun_stale:
            raise StaleRun(f"{run_dir} was made differently ({'; '.join(problems)}); "
                           "delete it or pass --rerun-stale")
        shutil.rmtree(run_dir)
        return "run"
    finished = (run_dir / "eval-final.json").is_file() and (run_dir / "metrics.jsonl").is_file()
    return "reuse" if finished else "run"


def run_one(world: str, name: str, replicate: int, out: Path, code: str, *,
            rerun_stale: bool = False, threads: int = 1) -> tuple[Path, bool]:
    """The run's directory, and whether it was run now (False: reused)."""
    config, _ = CONDITIONS[name]
    run_dir = out / world / name / f"rep{replicate}"
    stamp = run_stamp(world, name, replicate, code)
    try:
        if reuse_decision(run_dir, stamp, rerun_stale=rerun_stale) == "reuse":
            return run_dir, False
    except StaleRun as exc:
        raise SystemExit(str(exc)) from None
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / STAMP).write_text(json.dumps(stamp, indent=2, sort_keys=True) + "\n")
    cmd = [sys.executable, "-m", "renio_cli.main", "run", "--config",
           str(ROOT / "sample_configs" / config), f"run_dir={run_dir}",
           f"seed={stamp['seed']}", *stamp["overrides"]]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{world}/{name} replicate {replicate} (seed {stamp['seed']}) "
                         f"failed:\n{proc.stderr[-3000:]}")
    print(f"{world:>8} {name:>20} replicate {replicate}: {time.perf_counter() - t0:6.1f}s",
          flush=True)
    return run_dir, True


def eval_accuracy(path: Path) -> float:
    return json.loads(path.read_text())["metrics"]["avg_at_n"]


def chain_length(problem: str) -> int:
    """K of a chain problem such as ``7+5*3+9``: its number of operations."""
    return problem.count("+") + problem.count("*")


def eval_behaviour(eval_dir: Path, world: str) -> dict:
    """Accuracy, completion length and reflection-marker rate of one evaluation, and for the
    chain world the accuracy by K."""
    summary = json.loads((eval_dir / "eval.json").read_text())
    m = summary["metrics"]
    out = {"acc": m["avg_at_n"], "length": m["all"]["mean_length"],
           "reflection_per_1k": m["all"]["reflection_per_1k"] or 0.0,
           "wait_share": None, "by_k": {}}
    rows = pq.read_table(eval_dir / "eval.parquet",
                         columns=["prompt_id", "correct", "reflection_markers"]).to_pylist()
    out["wait_share"] = float(np.mean([r["reflection_markers"] > 0 for r in rows]))
    if world == "chain":
        ks = {}
        for line in Path(summary["bench"]).read_text().splitlines():
            item = json.loads(line)
            ks[item["id"]] = chain_length(item["problem"])
        by_k: dict[int, list[bool]] = {}
        for r in rows:
            by_k.setdefault(ks[r["prompt_id"]], []).append(bool(r["correct"]))
        out["by_k"] = {k: float(np.mean(v)) for k, v in sorted(by_k.items())}
    return out


def parse_chain(problem: str):
    """``7+5*3+9`` -> the chain world's ChainProblem (start 7, ops +5, *3, +9)."""
    from renio_core.modeling.toy.chain import ChainProblem

    ops = tuple((problem[i], int(problem[i + 1])) for i in range(1, len(problem), 2))
    return ChainProblem(int(problem[0]), ops)


_MARKER_CACHE: dict = {}


def _marker_probs(model, tok, prefixes: list[list[int]]) -> tuple[float, float]:
    """Mean P(first token of ``wait``) and mean P(all of ``wait``) right after each prefix
    (teacher forcing; the toy tokenizer spells ``wait`` in 4 tokens)."""
    from renio_core.modeling.toy import chain

    steps = chain.marker_logprobs(model, tok, prefixes)
    return (float(np.mean([math.exp(lp[0]) for lp in steps])),
            float(np.mean([math.exp(sum(lp)) for lp in steps])))


def marker_probabilities(bench: Path, adapter: Path | None) -> dict[str, float]:
    """The chain student's mean P(``wait``) right after an injected wrong line and after a
    right line (one step per test problem, chosen by a fixed seed), with ``adapter`` on it or
    without: the teacher's own targets (>= 0.5 and <= 0.05), asked of the trained student.
    Added after the first runs, as a measurement only: no condition or setting changed."""
    import random

    import torch

    from renio_core.modeling import models
    from renio_core.modeling.toy import chain

    key = (str(bench), str(adapter))
    if key in _MARKER_CACHE:
        return _MARKER_CACHE[key]
    torch.set_num_threads(1)
    tok = models.load_tokenizer(chain.resolve_chain_model("toy-chain:tokenizer"))
    model = models.load_model(chain.resolve_chain_model("toy-chain:student"),
                              adapter=str(adapter) if adapter else None, dtype="float32",
                              device="cpu")
    problems = [parse_chain(json.loads(line)["problem"]) for line in bench.read_text().splitlines()]
    wrong, right = chain.marker_prefixes(tok, problems,
                                         random.Random("replicate-marker-probability"))
    out = {}
    for name, prefixes in (("wrong", wrong), ("right", right)):
        out[f"p_w_{name}"], out[f"p_wait_{name}"] = _marker_probs(model, tok, prefixes)
    _MARKER_CACHE[key] = out
    return out


def collect(run_dir: Path, world: str) -> dict:
    """Accuracy after every evaluation, the weights of every rollout (pooled), the final and
    base evaluations' behaviour, and how many rows were sampled per row trained on."""
    steps, accs = [0], [eval_accuracy(run_dir / "eval-base" / "eval.json")]
    records = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    raw, weight, correct = [], [], []
    last_eval = None
    for r in records:
        it = run_dir / f"iter-{r['iteration']:05d}"
        if r["eval_accuracy"] is not None:
            steps.append(r["policy_step"])
            accs.append(r["eval_accuracy"])
            last_eval = it
        t = pq.read_table(it / "weights.parquet", columns=["raw_weight", "weight", "correct"])
        raw.extend(t.column("raw_weight").to_pylist())
        weight.extend(t.column("weight").to_pylist())
        correct.extend(t.column("correct").to_pylist())
    base, final = eval_behaviour(run_dir / "eval-base", world), eval_behaviour(last_eval, world)
    if world == "chain":
        bench = Path(json.loads((last_eval / "eval.json").read_text())["bench"])
        base.update(marker_probabilities(bench, None))
        final.update(marker_probabilities(
            bench, run_dir / f"iter-{records[-1]['iteration']:05d}" / "ckpt"))
    sampled = sum(r.get("fill_sampled") or 0 for r in records)
    kept = sum(r.get("fill_kept") or 0 for r in records)
    return {"steps": steps, "acc": accs, "raw": raw, "weight": weight, "correct": correct,
            "auroc": [r["auroc_incorrect"] for r in records],
            "rollout_acc": [r["rollout_accuracy"] for r in records],
            "base": base, "final": final,
            "sampled_per_kept": sampled / kept if kept else 1.0,
            "seconds": sum(r["seconds"] for r in records)}


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample std (ddof 1); the std is NaN for one value."""
    arr = np.asarray(values, dtype=float)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else float("nan")


def t_abs_cdf(t: float, df: int) -> float:
    """P(|T| <= t) for Student's t with integer ``df``, exactly (closed-form finite sums)."""
    if df < 1:
        raise ValueError(f"df must be >= 1, got {df}")
    if t <= 0:
        return 0.0
    theta = math.atan(t / math.sqrt(df))
    c2 = math.cos(theta) ** 2
    if df % 2 == 1:
        term, acc = math.cos(theta), 0.0
        for k in range(1, (df - 1) // 2 + 1):  # cos + 2/3 cos^3 + (2*4)/(3*5) cos^5 + ...
            acc += term
            term *= c2 * (2 * k) / (2 * k + 1)
        return 2 / math.pi * (theta + math.sin(theta) * acc)
    term, acc = 1.0, 0.0
    for k in range(1, df // 2 + 1):  # 1 + 1/2 cos^2 + (1*3)/(2*4) cos^4 + ...
        acc += term
        term *= c2 * (2 * k - 1) / (2 * k)
    return math.sin(theta) * acc


def t_quantile(df: int, confidence: float = 0.95) -> float:
    """The two-sided cut: P(|T| <= q) = confidence, for ``df`` degrees of freedom."""
    lo, hi = 0.0, 1.0
    while t_abs_cdf(hi, df) < confidence:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_abs_cdf(mid, df) < confidence else (lo, mid)
    return (lo + hi) / 2


def paired_test(a: list[float], b: list[float], *, better: str, worse: str) -> dict:
    """Paired t test of b - a over replicates (95%, two-sided).

    Returns mean, std, se, t, df, the cut, the two-sided p value and a verdict: ``better``
    or ``worse`` when |t| exceeds the cut, "within the noise" when it does not, and
    "undetermined" with fewer than MIN_SEEDS pairs.
    """
    diff = np.asarray(b, dtype=float) - np.asarray(a, dtype=float)
    n = len(diff)
    out = {"n": n, "mean": float(diff.mean()) if n else float("nan"), "std": float("nan"),
           "se": float("nan"), "t": float("nan"), "df": n - 1, "cut": float("nan"),
           "p": float("nan")}
    if n < MIN_SEEDS:
        out["verdict"] = f"undetermined ({n} seed{'s' if n != 1 else ''}; a verdict needs {MIN_SEEDS})"
        return out
    std = float(diff.std(ddof=1))
    se = std / math.sqrt(n)
    cut = t_quantile(n - 1)
    out.update(std=std, se=se, cut=cut)
    if se == 0:
        out["t"] = 0.0 if out["mean"] == 0 else math.copysign(math.inf, out["mean"])
    else:
        out["t"] = out["mean"] / se
    out["p"] = 1.0 - t_abs_cdf(abs(out["t"]), n - 1) if math.isfinite(out["t"]) else 0.0
    if abs(out["t"]) <= cut:
        out["verdict"] = "within the noise"
    else:
        out["verdict"] = better if out["mean"] > 0 else worse
    return out


def paired_finals(runs_by: dict[str, list[dict]], plain: str, treated: str):
    """Final accuracies of two conditions over the replicates both have (paired by index)."""
    n = min(len(runs_by[plain]), len(runs_by[treated]))
    return ([r["final"]["acc"] for r in runs_by[plain][:n]],
            [r["final"]["acc"] for r in runs_by[treated][:n]])


def pairs_needing_more(results: dict[str, dict[str, list[dict]]]) -> list[tuple[str, str, str]]:
    """(world, baseline, treatment) of every comparison in PAIRS whose paired standard error
    is larger than its mean difference (the issue's rule for adding replicates)."""
    out = []
    for w, runs_by in results.items():
        for plain, treated, _, _ in PAIRS:
            if plain in runs_by and treated in runs_by:
                a, b = paired_finals(runs_by, plain, treated)
                r = paired_test(a, b, better="", worse="")
                if r["n"] >= MIN_SEEDS and r["se"] > abs(r["mean"]):
                    out.append((w, plain, treated))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4],
                    help="replicate indices; each (world, condition, replicate) gets its own seed")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "replication")
    ap.add_argument("--docs", type=Path, default=ROOT / "docs")
    ap.add_argument("--worlds", nargs="+", default=list(WORLDS), choices=list(WORLDS))
    ap.add_argument("--conditions", nargs="+", default=list(CONDITIONS), choices=list(CONDITIONS))
    ap.add_argument("--jobs", type=int, default=2,
                    help="runs at once, each with (CPU cores / jobs) threads")
    ap.add_argument("--more-seeds", type=int, default=5,
                    help="further replicates for each comparison whose paired standard error "
                         "exceeds its effect after --seeds (0: none)")
    ap.add_argument("--rerun-stale", action="store_true",
                    help="delete and rerun run directories made with another config or code")
    args = ap.parse_args()

    from renio_core.modeling.toy import chain, ensure_toy_world

    ensure_toy_world()  # built once here, not by concurrent runs
    if "chain" in args.worlds:
        chain.ensure_chain_world()
    code = code_version()
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    t0 = time.perf_counter()
    load0 = os.getloadavg()[0]
    # Replicate-major, so a cut-short experiment still has every condition.
    tasks = [(w, name, rep) for rep in args.seeds for w in args.worlds for name in args.conditions]
    fresh: list[tuple] = []

    def run_all(batch: list[tuple]) -> dict[tuple, Path]:
        def one(t: tuple) -> Path:
            run_dir, ran = run_one(*t, args.out, code, rerun_stale=args.rerun_stale,
                                   threads=threads)
            if ran:
                fresh.append(t)
            return run_dir

        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            futures = {t: pool.submit(one, t) for t in batch}
            return {t: f.result() for t, f in futures.items()}

    dirs = run_all(tasks)
    results: dict[str, dict[str, list[dict]]] = {}
    for (w, name, rep) in tasks:
        results.setdefault(w, {}).setdefault(name, []).append(collect(dirs[(w, name, rep)], w))
    # One more round, fixed before any run: a comparison whose paired standard error exceeds
    # its effect gets args.more_seeds further replicates of both its conditions.
    need = pairs_needing_more(results) if args.more_seeds else []
    more = range(max(args.seeds) + 1, max(args.seeds) + 1 + args.more_seeds)
    extra = sorted({(w, name, rep) for w, a, b in need for name in (a, b) for rep in more},
                   key=lambda t: (t[2], t[0], t[1]))
    dirs = run_all(extra)
    for (w, name, rep) in extra:
        results[w][name].append(collect(dirs[(w, name, rep)], w))
    wall = time.perf_counter() - t0
    run = {"seeds": args.seeds, "more_seeds": [list(x) for x in need],
           "more_replicates": list(more) if need else [], "worlds": args.worlds,
           "conditions": args.conditions, "jobs": args.jobs, "threads": threads,
           "wall_s": wall, "code_version": code, "load_before": load0,
           "load_after": os.getloadavg()[0]}
    # The invocations that ran something with this code, each with its own wall time: a
    # rerun that only reuses adds none.
    phase = {"runs": len(fresh), "jobs": args.jobs, "threads": threads, "wall_s": wall,
             "load_before": load0, "load_after": run["load_after"]}
    phases = [phase] if fresh else []
    previous = args.out / "results.json"
    if previous.is_file():
        old = json.loads(previous.read_text())["run"]
        if old.get("code_version") == code:
            earlier = old.get("phases") or [{  # written before phases were recorded
                "runs": len(old["seeds"]) * len(old.get("worlds", WORLDS))
                * len(old.get("conditions", CONDITIONS)),
                **{k: old[k] for k in ("jobs", "threads", "wall_s", "load_before", "load_after")}}]
            phases = earlier + phases
    run["phases"] = phases
    run["wall_s"] = sum(ph["wall_s"] for ph in phases)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({"run": run, "results": results}))
    args.docs.mkdir(parents=True, exist_ok=True)
    plot(args.docs, results, len(args.seeds))
    write_report(args.docs, run, results)


def plot(docs: Path, results: dict, n_seeds: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    worlds = list(results)
    fig, axes = plt.subplots(1, len(worlds), figsize=(6.5 * len(worlds), 4.4), squeeze=False)
    for ax, w in zip(axes[0], worlds):
        for name, runs in results[w].items():
            steps = runs[0]["steps"]
            accs = np.array([r["acc"] for r in runs])
            m = accs.mean(0)
            se = accs.std(0, ddof=1) / math.sqrt(len(runs)) if len(runs) > 1 else 0 * m
            style = "-" if "renio" in name else ("--" if name in ("opd", "opsd") else ":")
            ax.plot(steps, m, style, marker="o", ms=3, label=name)
            ax.fill_between(steps, m - se, m + se, alpha=0.12)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("held-out accuracy (avg@2)")
        ax.set_title(f"{w} world (mean ± s.e. over {n_seeds} replicates)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(docs / "replication-accuracy.png", dpi=110)
    plt.close(fig)

    # Weights of correct and incorrect rollouts, pooled over each world's ReNIO runs.
    fig, axes = plt.subplots(len(worlds), 2, figsize=(9, 3.3 * len(worlds)), squeeze=False)
    for row, w in zip(axes, worlds):
        pooled = {"raw": [], "weight": [], "correct": []}
        for name in ("opd-renio", "opsd-renio"):
            for r in results[w].get(name, []):
                for key in pooled:
                    pooled[key].extend(r[key])
        if not pooled["raw"]:
            continue
        wts, lb = np.array(pooled["weight"]), np.log(np.array(pooled["raw"]))
        ok = np.array([c is True for c in pooled["correct"]])
        bad = np.array([c is False for c in pooled["correct"]])
        for ax, values, label in ((row[0], wts, "normalized weight (batch_mean)"),
                                  (row[1], lb, "log raw weight = mean pivotal log-ratio / tem")):
            bins = np.linspace(values.min(), values.max() + 1e-9, 40)
            ax.hist(values[ok], bins=bins, alpha=0.7, label=f"correct ({ok.sum()})", color="tab:blue")
            ax.hist(values[bad], bins=bins, alpha=0.7, label=f"incorrect ({bad.sum()})", color="tab:red")
            ax.set_xlabel(label)
            ax.set_title(f"{w} world, OPD+ReNIO and OPSD+ReNIO rollouts", fontsize=9)
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(docs / "replication-weights.png", dpi=110)
    plt.close(fig)

    if "chain" in results:
        fig, ax = plt.subplots(figsize=(7, 4.2))
        runs0 = next(iter(results["chain"].values()))
        ks = sorted(runs0[0]["base"]["by_k"], key=int)
        base = np.array([[r["base"]["by_k"][k] for k in ks] for rs in results["chain"].values()
                         for r in rs])
        ax.plot([int(k) for k in ks], base.mean(0), "k-", marker="s", label="before training")
        for name, runs in results["chain"].items():
            acc = np.array([[r["final"]["by_k"][k] for k in ks] for r in runs])
            style = "-" if "renio" in name else ("--" if name in ("opd", "opsd") else ":")
            ax.plot([int(k) for k in ks], acc.mean(0), style, marker="o", ms=3, label=name)
        ax.set_xlabel("chain length K")
        ax.set_ylabel("held-out accuracy after training")
        ax.set_title(f"chain world: accuracy by K (mean over {n_seeds} replicates)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(docs / "replication-chain-by-k.png", dpi=110)
        plt.close(fig)


def auroc_of(runs: list[dict]) -> float | None:
    from renio_core.formulas.weighting import auroc

    raw = np.concatenate([r["raw"] for r in runs])
    correct = [c for r in runs for c in r["correct"]]
    graded = np.array([c is not None for c in correct])
    incorrect = np.array([c is False for c in correct])
    if not graded.any():
        return None
    value = auroc(raw[graded], incorrect[graded])
    return None if math.isnan(value) else value


def pct(v: float) -> str:
    return f"{v:.1%}"


def world_section(w: str, runs_by: dict[str, list[dict]]) -> list[str]:
    base = [r["base"]["acc"] for runs in runs_by.values() for r in runs]
    lines = [f"## The {w} world", "",
             f"Student before training: {np.mean(base):.1%} (mean of every run's own base "
             f"evaluation; {len(base)} evaluations).", "",
             "| condition | replicates | final accuracy (mean ± s.e.) | gain over its base | "
             "AUROC of raw weight for incorrect rollouts | rows sampled per row trained |",
             "| --- | --- | --- | --- | --- | --- |"]
    finals = {name: [r["final"]["acc"] for r in runs] for name, runs in runs_by.items()}
    for name, runs in runs_by.items():
        m, sd = mean_std(finals[name])
        se = sd / math.sqrt(len(runs)) if len(runs) > 1 else float("nan")
        gain = np.mean([r["final"]["acc"] - r["base"]["acc"] for r in runs])
        a = auroc_of(runs) if "renio" in name else None
        lines.append(f"| {name} | {len(runs)} | {m:.1%} ± {se:.1%} | {gain:+.1%} | "
                     f"{'-' if a is None else f'{a:.3f}'} | "
                     f"{np.mean([r['sampled_per_kept'] for r in runs]):.2f} |")
    lines += ["", "Final accuracy of each replicate:", ""]
    for name, final in finals.items():
        lines.append(f"- {name}: " + ", ".join(pct(v) for v in final))
    lines += ["", "Paired differences (treatment - baseline, paired by replicate; two-sided "
              "t test at 95%):", ""]
    for plain, treated, better, worse in PAIRS:
        if plain in finals and treated in finals:
            r = paired_test(*paired_finals(runs_by, plain, treated), better=better, worse=worse)
            lines.append(f"- {treated} - {plain}: {describe_test(r)}.")
    lines += ["", "Behaviour of the student at the final evaluation (mean over replicates; "
              "length in tokens; reflection markers per 1,000 tokens; share of completions "
              "with at least one reflection marker):", "",
              "| condition | accuracy | mean length | reflection / 1k | completions with a marker |",
              "| --- | --- | --- | --- | --- |"]
    all_runs = [r for runs in runs_by.values() for r in runs]
    lines.append(f"| before training | {np.mean([r['base']['acc'] for r in all_runs]):.1%} | "
                 f"{np.mean([r['base']['length'] for r in all_runs]):.1f} | "
                 f"{np.mean([r['base']['reflection_per_1k'] for r in all_runs]):.2f} | "
                 f"{np.mean([r['base']['wait_share'] for r in all_runs]):.1%} |")
    for name, runs in runs_by.items():
        f = [r["final"] for r in runs]
        lines.append(f"| {name} | {np.mean([x['acc'] for x in f]):.1%} | "
                     f"{np.mean([x['length'] for x in f]):.1f} | "
                     f"{np.mean([x['reflection_per_1k'] for x in f]):.2f} | "
                     f"{np.mean([x['wait_share'] for x in f]):.1%} |")
    if w == "chain":
        lines += ["", "The student's probability of the marker `wait` (4 tokens here) and of its "
                  "first token `w`, right after an injected wrong line and after a right line "
                  "(teacher forcing, one step of each of the 256 test problems; the teacher's "
                  "P(wait) are 0.9997 and 0.00002). Measured on each run's final adapter; this "
                  "measurement was added after the first runs, with no condition or setting "
                  "changed:", "",
                  "| condition | P(wait \\| wrong line) | P(wait \\| right line) | "
                  "P(w \\| wrong line) | P(w \\| right line) |",
                  "| --- | --- | --- | --- | --- |"]
        cols = ("p_wait_wrong", "p_wait_right", "p_w_wrong", "p_w_right")
        lines.append("| before training | " + " | ".join(
            f"{all_runs[0]['base'][c]:.2e}" for c in cols) + " |")
        for name, runs in runs_by.items():
            lines.append(f"| {name} | " + " | ".join(
                f"{np.mean([r['final'][c] for r in runs]):.2e}" for c in cols) + " |")
    if "opd-correct-only" in runs_by and "opd-incorrect-only" in runs_by:
        lines += ["", "Incorrect-only against correct-only training (paired by replicate):", ""]
        keys = [("length", "mean completion length (tokens)", "{:+.2f}"),
                ("reflection_per_1k", "reflection markers per 1k tokens", "{:+.2f}")]
        if w == "chain":
            keys.append(("p_wait_wrong", "P(wait | injected wrong line)", "{:+.2e}"))
        for key, label, fmt in keys:
            n = min(len(runs_by["opd-correct-only"]), len(runs_by["opd-incorrect-only"]))
            a = [r["final"][key] for r in runs_by["opd-correct-only"][:n]]
            b = [r["final"][key] for r in runs_by["opd-incorrect-only"][:n]]
            r = paired_test(a, b, better="higher after incorrect-only",
                            worse="higher after correct-only")
            lines.append(f"- {label}: correct-only {fmt.format(np.mean(a)).lstrip('+')}, "
                         f"incorrect-only {fmt.format(np.mean(b)).lstrip('+')}; difference "
                         f"{describe_test(r, fmt=fmt)}.")
    if w == "chain":
        ks = sorted(all_runs[0]["base"]["by_k"], key=int)
        lines += ["", "Accuracy by chain length K at the final evaluation (mean over "
                  "replicates; 256 test problems x 2 samples, about 43 problems per K):", "",
                  "| condition | " + " | ".join(f"K={k}" for k in ks) + " |",
                  "| --- |" + " --- |" * len(ks)]
        lines.append("| before training | " + " | ".join(
            pct(np.mean([r["base"]["by_k"][k] for r in all_runs])) for k in ks) + " |")
        for name, runs in runs_by.items():
            lines.append(f"| {name} | " + " | ".join(
                pct(np.mean([r["final"]["by_k"][k] for r in runs])) for k in ks) + " |")
    return lines + [""]


def more_text(run: dict) -> str:
    """How the comparisons that got further replicates are described in the report."""
    if not run.get("more_seeds"):
        return ""
    reps = run["more_replicates"]
    which = "; ".join(f"{w}: {b} - {a}" for w, a, b in run["more_seeds"])
    return (f"; where the paired standard error after them exceeded the effect, both "
            f"conditions got replicates {reps[0]}-{reps[-1]} too, as the script fixes in "
            f"advance: {which}")


def write_report(docs: Path, run: dict, results: dict) -> None:
    n = len(run["seeds"])
    lines = [
        "# Toy replication of ReNIO's comparisons",
        "",
        f"Made by `python experiments/replicate.py` (replicates {', '.join(map(str, run['seeds']))}; "
        f"{run['wall_s'] / 60:.1f} min of wall time on this {os.cpu_count()}-core CPU in all: "
        + "; then ".join(
            f"{ph['runs']} runs {ph['jobs']} at a time with {ph['threads']} thread(s) each in "
            f"{ph['wall_s'] / 60:.1f} min (load average {ph['load_before']:.1f} before, "
            f"{ph['load_after']:.1f} after)" for ph in run["phases"])
        + f"; code version {run['code_version']}). Run directories are "
        "reused only when their config and code version match.",
        "",
        "Every run is `renio run` with the faithful loop (`sample_configs/toy-*.yaml`): 64 "
        "iterations, each one AdamW step (LoRA r 16, lr 3e-4, linear to 0, JSD with beta 0) on "
        "a fresh batch of 32 prompts x 1 sample at T 1.1 / top-p 0.95 / top-k 20, ReNIO "
        "normalized over groups of 8; the held-out evaluation every "
        f"{EVAL_EVERY} steps at T 1.1, 2 samples per problem (addition: 128 problems; chain: "
        "all 256). Conditions are in the script's docstring; the filtered runs sample until "
        "each step has 32 rows of their kind, so every condition takes 64 steps of 32 rows. "
        "Every (world, condition, replicate) has its own seed, so each run's base evaluation "
        f"differs a little. Differences are paired by replicate ({n} pairs{more_text(run)}) "
        "and tested with a "
        "two-sided t test at 95% (t quantile for n - 1 degrees of freedom); fewer than "
        f"{MIN_SEEDS} replicates give \"undetermined\". s.e. = standard error of the mean.",
        "",
    ]
    for w, runs_by in results.items():
        lines += world_section(w, runs_by)
    lines += ["![accuracy against step](replication-accuracy.png)", "",
              "![weights of correct and incorrect rollouts](replication-weights.png)", ""]
    if "chain" in results:
        lines += ["![chain world: accuracy by K](replication-chain-by-k.png)", ""]
    (docs / "replication.md").write_text("\n".join(lines))
    print("\n".join(lines))


def describe_test(r: dict, fmt: str = "{:+.1%}") -> str:
    """One line for a paired_test result."""
    mean = fmt.format(r["mean"])
    if r["n"] < MIN_SEEDS:
        return f"{mean} over {r['n']} replicate(s): {r['verdict']}"
    return (f"{mean} (paired over {r['n']} replicates: s.e. {fmt.format(r['se']).lstrip('+')}, "
            f"t = {r['t']:+.2f}, 95% cut {r['cut']:.2f} for {r['df']} degrees of freedom, "
            f"p = {r['p']:.3f}): {r['verdict']}")


if __name__ == "__main__":
    main()
