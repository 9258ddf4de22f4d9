"""The toy replication of the paper's comparisons, in one command.

    python experiments/replicate.py [--seeds 0 1 2 3 4] [--out runs/replication] [--docs docs]

Runs, for every seed and at the same compute (iterations, prompts per iteration, samples per
prompt, train steps per rollout batch):

    opd               plain OPD (every sample weighs 1)          sample_configs/toy-opd.yaml
    opd-renio         OPD + ReNIO weights                        sample_configs/toy-opd-renio.yaml
    opsd              plain OPSD (teacher: self + privileged)    sample_configs/toy-opsd.yaml
    opsd-renio        OPSD + ReNIO weights                       sample_configs/toy-opsd-renio.yaml
    opd-correct-only  OPD trained only on samples that ended right    (--filter correct)
    opd-incorrect-only OPD trained only on samples that ended wrong   (--filter incorrect)
    opd-renio-tem4    ablation: OPD + ReNIO with softer weights (tem 4)

Each run is the real CLI (`renio run`). A run directory carries ``replicate-stamp.json``: the
run's full config (YAML file, overrides, seed) and a digest of the code that made it. A
finished run is reused only when both match; a directory made with another config or code
version (or with no stamp) is refused, naming the difference, unless ``--rerun-stale`` is given,
which deletes it and runs again. Every (condition, replicate) pair gets its own run seed, spaced
so that no seed derived from it inside ``renio run`` (rollout, train, eval) equals one of another
run (see ``run_seed``). Differences between conditions are judged with a paired t test at 95%
(two-sided, the t quantile for n - 1 degrees of freedom, computed exactly); with fewer than
``MIN_SEEDS`` seeds the verdict is "undetermined". Results go to
``docs/replication.md`` (mean ± std table, AUROC of the weights for incorrect samples) and two
PNG plots: accuracy against train step, and the weight distribution of correct against
incorrect samples.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
CONDITIONS = {
    "opd": ("toy-opd.yaml", []),
    "opd-renio": ("toy-opd-renio.yaml", []),
    "opsd": ("toy-opsd.yaml", []),
    "opsd-renio": ("toy-opsd-renio.yaml", []),
    "opd-correct-only": ("toy-opd.yaml", ["weight.filter=correct"]),
    "opd-incorrect-only": ("toy-opd.yaml", ["weight.filter=incorrect"]),
    # Ablation: softer weights (raw = exp(m / 4)), to test whether ReNIO's cost here comes
    # from concentrating each group's weight on a few rollouts.
    "opd-renio-tem4": ("toy-opd-renio.yaml", ["weight.tem=4"]),
}
COMMON = ["eval_every=1"]
# Fixed slot per condition for seed derivation; append new conditions, never reorder.
CONDITION_SLOT = {name: i for i, name in enumerate(CONDITIONS)}
MAX_SLOTS = 64
# renio run derives, from its seed s: rollout s * 100003 + it, train s + it, eval s + 7919
# (renio_core/stages/run_loop.py). A stride larger than 7919 + iterations keeps the ranges of
# different runs apart.
SEED_STRIDE = 10_000
MIN_SEEDS = 3
STAMP = "replicate-stamp.json"


def run_seed(name: str, replicate: int) -> int:
    """The ``seed`` given to ``renio run`` for one condition's replicate: unique per pair."""
    if replicate < 0:
        raise ValueError(f"replicate must be >= 0, got {replicate}")
    return (replicate * MAX_SLOTS + CONDITION_SLOT[name] + 1) * SEED_STRIDE


def derived_seeds(seed: int, iterations: int) -> set[tuple[str, int]]:
    """Every torch/python seed ``renio run`` derives from ``seed`` (see SEED_STRIDE)."""
    out = {("eval", seed + 7919)}
    for it in range(iterations):
        out.add(("rollout", seed * 100003 + it))
        out.add(("train", seed + it))
    return out


def code_version() -> str:
    """Digest of the code that decides a run's outcome: renio_core, renio_cli, sample_configs."""
    h = hashlib.sha256()
    for sub in ("renio_core", "renio_cli", "sample_configs"):
        for path in sorted((ROOT / sub).rglob("*")):
            if path.suffix in (".py", ".yaml", ".jinja") and path.is_file():
                h.update(str(path.relative_to(ROOT)).encode() + b"\0")
                h.update(path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def run_stamp(name: str, replicate: int, code: str) -> dict:
    """What a run directory must have been made with to be reused."""
    config, extra = CONDITIONS[name]
    return {"condition": name, "replicate": replicate, "seed": run_seed(name, replicate),
            "config_file": config,
            "config_text": (ROOT / "sample_configs" / config).read_text(),
            "overrides": [*COMMON, *extra], "code_version": code}


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


def run_one(name: str, replicate: int, out: Path, code: str, *, rerun_stale: bool = False) -> Path:
    config, extra = CONDITIONS[name]
    run_dir = out / name / f"rep{replicate}"
    stamp = run_stamp(name, replicate, code)
    try:
        if reuse_decision(run_dir, stamp, rerun_stale=rerun_stale) == "reuse":
            return run_dir
    except StaleRun as exc:
        raise SystemExit(str(exc)) from None
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / STAMP).write_text(json.dumps(stamp, indent=2, sort_keys=True) + "\n")
    cmd = [sys.executable, "-m", "renio_cli.main", "run", "--config",
           str(ROOT / "sample_configs" / config), f"run_dir={run_dir}",
           f"seed={stamp['seed']}", *COMMON, *extra]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{name} replicate {replicate} (seed {stamp['seed']}) failed:\n{proc.stderr[-3000:]}")
    print(f"{name:>20} replicate {replicate}: {time.perf_counter() - t0:5.1f}s", flush=True)
    return run_dir


def eval_accuracy(path: Path) -> float:
    return json.loads(path.read_text())["metrics"]["avg_at_n"]


def collect(run_dir: Path) -> dict:
    """Accuracy after every iteration, and the weights of every rollout (pooled)."""
    steps, accs = [0], [eval_accuracy(run_dir / "eval-base" / "eval.json")]
    records = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    raw, weight, correct = [], [], []
    for r in records:
        it = run_dir / f"iter-{r['iteration']:05d}"
        if r["eval_accuracy"] is not None:
            steps.append(r["policy_step"])
            accs.append(r["eval_accuracy"])
        t = pq.read_table(it / "weights.parquet", columns=["raw_weight", "weight", "correct"])
        raw.extend(t.column("raw_weight").to_pylist())
        weight.extend(t.column("weight").to_pylist())
        correct.extend(t.column("correct").to_pylist())
    return {"steps": steps, "acc": accs, "raw": raw, "weight": weight, "correct": correct,
            "auroc": [r["auroc_incorrect"] for r in records]}


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4],
                    help="replicate indices; each (condition, replicate) gets its own run seed")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "replication")
    ap.add_argument("--docs", type=Path, default=ROOT / "docs")
    ap.add_argument("--conditions", nargs="+", default=list(CONDITIONS))
    ap.add_argument("--rerun-stale", action="store_true",
                    help="delete and rerun run directories made with another config or code")
    args = ap.parse_args()

    from renio_core.formulas.weighting import auroc
    from renio_core.modeling.toy import ensure_toy_world

    ensure_toy_world()
    code = code_version()
    t0 = time.perf_counter()
    results: dict[str, list[dict]] = {}
    for rep in args.seeds:  # replicate-major, so a cut-short run still has every condition
        for name in args.conditions:
            run_dir = run_one(name, rep, args.out, code, rerun_stale=args.rerun_stale)
            results.setdefault(name, []).append(collect(run_dir))
    wall = time.perf_counter() - t0
    args.docs.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Accuracy against train step, mean ± std over seeds.
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, runs in results.items():
        steps = runs[0]["steps"]
        accs = np.array([r["acc"] for r in runs])
        m, s = accs.mean(0), accs.std(0, ddof=1) if len(runs) > 1 else np.zeros(accs.shape[1])
        style = "-" if "renio" in name else ("--" if name in ("opd", "opsd") else ":")
        ax.plot(steps, m, style, marker="o", label=name)
        ax.fill_between(steps, m - s, m + s, alpha=0.15)
    ax.set_xlabel("train step")
    ax.set_ylabel("toy test accuracy (avg@2, 128 problems)")
    ax.set_title(f"Toy world: accuracy against step (mean ± std over {len(args.seeds)} seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.docs / "replication-accuracy.png", dpi=110)
    plt.close(fig)

    # Weight distribution, correct against incorrect, pooled over the ReNIO runs.
    pooled = {"raw": [], "weight": [], "correct": []}
    for name in ("opd-renio", "opsd-renio"):
        for r in results.get(name, []):
            for key in pooled:
                pooled[key].extend(r[key])
    aurocs = {}
    if pooled["raw"]:
        raw = np.array(pooled["raw"])
        w = np.array(pooled["weight"])
        ok = np.array([c is True for c in pooled["correct"]])
        bad = np.array([c is False for c in pooled["correct"]])
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
        bins = np.linspace(0, max(w.max(), 1.0) * 1.02, 40)
        axes[0].hist(w[ok], bins=bins, alpha=0.7, label=f"correct ({ok.sum()})", color="tab:blue")
        axes[0].hist(w[bad], bins=bins, alpha=0.7, label=f"incorrect ({bad.sum()})", color="tab:red")
        axes[0].set_xlabel("normalized weight (batch_mean)")
        axes[0].set_ylabel("samples")
        axes[0].legend(fontsize=8)
        lb = np.log(raw)
        bins = np.linspace(lb.min(), lb.max() + 1e-9, 40)
        axes[1].hist(lb[ok], bins=bins, alpha=0.7, label="correct", color="tab:blue")
        axes[1].hist(lb[bad], bins=bins, alpha=0.7, label="incorrect", color="tab:red")
        axes[1].set_xlabel("log raw weight = mean pivotal log-ratio / tem")
        axes[1].legend(fontsize=8)
        fig.suptitle("ReNIO weights of toy rollouts, pooled over OPD+ReNIO and OPSD+ReNIO runs")
        fig.tight_layout()
        fig.savefig(args.docs / "replication-weights.png", dpi=110)
        plt.close(fig)
    for name, runs in results.items():
        raw = np.concatenate([r["raw"] for r in runs])
        correct = [c for r in runs for c in r["correct"]]
        graded = np.array([c is not None for c in correct])
        incorrect = np.array([c is False for c in correct])
        value = auroc(raw[graded], incorrect[graded])
        aurocs[name] = None if math.isnan(value) else value

    write_report(args, results, aurocs, wall)


def write_report(args, results, aurocs, wall) -> None:
    base = [r["acc"][0] for r in results[next(iter(results))]]
    lines = [
        "# Toy replication of ReNIO's comparisons",
        "",
        "Made by `python experiments/replicate.py` "
        f"(replicates {', '.join(map(str, args.seeds))}, each condition with its own run seed; "
        f"{wall / 60:.1f} min on this 2-core CPU, including reused runs' collection only: "
        "run directories are reused only when their config and code version match). Every "
        "run: the toy world's student, 4 on-policy iterations of 32 prompts x 4 samples (128 "
        "rollouts), one epoch of LoRA training per iteration (micro-batches of 8), evaluated "
        "after every iteration on 128 held-out problems x 2 samples (T 1.1). Filtered runs "
        "train on fewer rows, so they take fewer optimizer steps from the same rollouts.",
        "",
        f"Student before training: {np.mean(base):.1%} averaged over replicates. Differences "
        f"are paired by replicate and tested with a two-sided t test at 95% (t quantile for "
        f"n - 1 degrees of freedom); fewer than {MIN_SEEDS} replicates give \"undetermined\".",
        "",
        "| condition | final accuracy (mean ± std) | gain over base | AUROC of raw weight for incorrect rollouts |",
        "| --- | --- | --- | --- |",
    ]
    finals = {}
    for name, runs in results.items():
        final = [r["acc"][-1] for r in runs]
        finals[name] = final
        m, s = mean_std(final)
        a = aurocs.get(name)
        lines.append(f"| {name} | {m:.1%} ± {s:.1%} | {m - np.mean(base):+.1%} | "
                     f"{'-' if a is None else f'{a:.3f}'} |")
    lines += ["", "Per-seed final accuracies:", ""]
    for name, final in finals.items():
        lines.append(f"- {name}: " + ", ".join(f"{v:.1%}" for v in final))
    lines += ["", "## Does ReNIO help in the toy world?", ""]
    for plain, renio in (("opd", "opd-renio"), ("opsd", "opsd-renio"), ("opd", "opd-renio-tem4")):
        if plain in finals and renio in finals:
            r = paired_test(finals[plain], finals[renio], better="ReNIO helps",
                            worse="ReNIO hurts")
            lines.append(f"- {renio} - {plain}: {describe_test(r)}; seed-to-seed std of "
                         f"{plain} itself: {mean_std(finals[plain])[1]:.1%}.")
    if "opd-correct-only" in finals and "opd-incorrect-only" in finals:
        r = paired_test(finals["opd-correct-only"], finals["opd-incorrect-only"],
                        better="incorrect-only is better", worse="correct-only is better")
        lines.append(f"- incorrect-only - correct-only (controlled filtering): {describe_test(r)}.")
    lines += [
        "",
        "![accuracy against step](replication-accuracy.png)",
        "",
        "![weights of correct and incorrect rollouts](replication-weights.png)",
        "",
    ]
    (args.docs / "replication.md").write_text("\n".join(lines))
    print("\n".join(lines))


def describe_test(r: dict) -> str:
    """One line for a paired_test result."""
    if r["n"] < MIN_SEEDS:
        return f"{r['mean']:+.1%} over {r['n']} replicate(s): {r['verdict']}"
    return (f"{r['mean']:+.1%} (paired over {r['n']} replicates: std {r['std']:.1%}, standard "
            f"error {r['se']:.1%}, t = {r['t']:+.2f}, 95% cut {r['cut']:.2f} for {r['df']} "
            f"degrees of freedom, p = {r['p']:.3f}): {r['verdict']}")


if __name__ == "__main__":
    main()
