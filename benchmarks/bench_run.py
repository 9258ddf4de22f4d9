"""Overhead of `renio run` with one optimizer step per rollout batch, on the toy world.

    python benchmarks/bench_run.py [--iterations 12] [--prompts 32 8] [--repeats 2]

Each iteration of the loop samples, scores, weighs and trains one step; everything else it
does (loading a stage's inputs, writing shards and the checkpoint with its optimizer state,
swapping adapters, metrics) is overhead. From one process, for each batch size, this prints
the per-iteration wall time against the stages' own work as the loop records it
(`metrics.jsonl` "time": sample_work + score_work + weight + train_steps), and their ratio
with min / median / max over the iterations (the first, which warms up, is left out).
The issue's goal: ratio <= 1.3.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from renio_core.modeling.toy import ensure_toy_world  # noqa: E402
from renio_core.run.config import load_run_config  # noqa: E402
from renio_core.run.loop import run_loop  # noqa: E402

CONFIG = ROOT / "sample_configs" / "toy-opd-renio.yaml"
WORK = ("sample_work", "score_work", "weight", "train_steps")


def one_run(run_dir: Path, iterations: int, prompts: int) -> list[dict]:
    cfg = load_run_config(CONFIG, [
        f"run_dir={run_dir}", f"iterations={iterations}", f"prompts_per_iteration={prompts}",
        "rollout.n=1", f"weight.group_size={min(8, prompts)}", "eval_every=0",
        "train.steps_per_batch=1"])
    run_loop(cfg)
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iterations", type=int, default=12)
    ap.add_argument("--prompts", type=int, nargs="+", default=[32, 8])
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    ensure_toy_world()
    print(f"{'prompts':>7} {'iter s':>7} {'work s':>7} {'ratio min':>9} {'median':>7} {'max':>6}"
          f"   split (sample/score/weight/train/other, s)")
    for prompts in args.prompts:
        ratios, totals, works, split = [], [], [], {}
        for rep in range(args.repeats):
            with tempfile.TemporaryDirectory() as tmp:
                records = one_run(Path(tmp) / "run", args.iterations, prompts)[1:]
            for r in records:
                work = sum(r["time"][k] for k in WORK)
                ratios.append(r["seconds"] / work)
                totals.append(r["seconds"])
                works.append(work)
                for k in ("sample", "score", "weight", "train", "other"):
                    split.setdefault(k, []).append(r["time"][k])
        parts = "/".join(f"{statistics.mean(v):.3f}" for v in split.values())
        print(f"{prompts:>7} {statistics.mean(totals):>7.3f} {statistics.mean(works):>7.3f} "
              f"{min(ratios):>9.2f} {statistics.median(ratios):>7.2f} {max(ratios):>6.2f}   {parts}")


if __name__ == "__main__":
    main()
