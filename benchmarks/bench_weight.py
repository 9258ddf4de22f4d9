"""Throughput and memory of `renio weight` on a synthetic 20M-token scores file.

    python benchmarks/bench_weight.py [--tokens 20000000] [--dir bench_data]

Prints, from one run:
  * the baseline: pyarrow alone streaming the two log-prob columns (same batch size),
  * `renio weight` in this process (read all columns, validate, weigh, write all columns),
  * their ratio, and the peak RSS of `renio weight` run as a CLI subprocess.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from renio_core.stages.weight import WeightConfig, run_weight

COMPLETION_LEN = 1024  # the official max_new_tokens
PROMPT_LEN = 96


def build_scores(path: Path, tokens: int, seed: int = 0) -> None:
    """Rows of variable completion length, written in row groups as `renio score` would."""
    rng = np.random.default_rng(seed)
    writer = None
    written = 0
    row = 0
    while written < tokens:
        rows = 2048
        lengths = rng.integers(COMPLETION_LEN // 4, COMPLETION_LEN + 1, size=rows).astype(np.int32)
        n = int(lengths.sum())
        offsets = pa.array(np.r_[0, np.cumsum(lengths)].astype(np.int32))
        p_offsets = pa.array(np.arange(0, (rows + 1) * PROMPT_LEN, PROMPT_LEN, dtype=np.int32))
        student = -rng.exponential(0.4, size=n).astype(np.float32)
        teacher = (student - rng.exponential(0.5, size=n)).astype(np.float32)
        prompt = rng.integers(0, 150_000, size=rows * PROMPT_LEN, dtype=np.int32)
        table = pa.table({
            "prompt_id": pa.array([f"q{(row + i) // 8}" for i in range(rows)]),
            "sample_index": pa.array(((row + np.arange(rows)) % 8).astype(np.int32)),
            "prompt_ids": pa.ListArray.from_arrays(p_offsets, pa.array(prompt)),
            "completion_ids": pa.ListArray.from_arrays(
                offsets, pa.array(rng.integers(0, 150_000, size=n, dtype=np.int32))),
            "student_logprobs": pa.ListArray.from_arrays(offsets, pa.array(student)),
            "teacher_logprobs": pa.ListArray.from_arrays(offsets, pa.array(teacher)),
            "teacher_prompt_ids": pa.ListArray.from_arrays(p_offsets, pa.array(prompt)),
            "correct": pa.array(rng.random(rows) < 0.5),
        })
        if writer is None:
            writer = pq.ParquetWriter(path, table.schema, compression="zstd", compression_level=1)
        writer.write_table(table, row_group_size=2048)
        written += n
        row += rows
    writer.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=20_000_000)
    ap.add_argument("--dir", type=Path, default=Path("bench_data"))
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    src = args.dir / f"scores-{args.tokens}.parquet"
    if not src.exists():
        t0 = time.perf_counter()
        build_scores(src, args.tokens)
        print(f"built {src} in {time.perf_counter() - t0:.1f}s")
    meta = pq.ParquetFile(src).metadata
    lengths = pq.read_table(src, columns=["completion_ids"]).column("completion_ids")
    tokens = int(pa.compute.sum(pa.compute.list_value_length(lengths)).as_py())
    del lengths
    size_mb = src.stat().st_size / 2**20
    print(f"input: {meta.num_rows:,} rows, {tokens:,} completion tokens, {size_mb:,.0f} MiB")

    def baseline(**options) -> float:
        t0 = time.perf_counter()
        for _ in pq.ParquetFile(src, **options).iter_batches(
                batch_size=4096, columns=["student_logprobs", "teacher_logprobs"]):
            pass
        return time.perf_counter() - t0

    def weigh() -> float:
        out = args.dir / "weights-bench.parquet"
        t0 = time.perf_counter()
        run_weight(WeightConfig(input=str(src), out=str(out), overwrite=True))
        elapsed = time.perf_counter() - t0
        out.unlink()
        return elapsed

    # Interleaved, best of N each, so that background load hits all three alike.
    base, base_mmap, ours = [], [], []
    for _ in range(args.repeats):
        base.append(baseline())
        base_mmap.append(baseline(memory_map=True))
        ours.append(weigh())
    base, base_mmap, ours = min(base), min(base_mmap), min(ours)
    print(f"pyarrow read of the two log-prob columns:          {tokens / base / 1e6:6.1f} M tokens/s ({base:.3f}s)")
    print(f"  the same, memory-mapped (as renio reads):        {tokens / base_mmap / 1e6:6.1f} M tokens/s ({base_mmap:.3f}s)")
    print(f"renio weight (read 3 columns, validate, weigh, write all): {tokens / ours / 1e6:6.1f} M tokens/s ({ours:.3f}s)")
    print(f"ratio renio weight / pyarrow read: {base / ours:.2f} (against the memory-mapped read: {base_mmap / ours:.2f})")

    out = args.dir / "weights-rss.parquet"
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    subprocess.run([sys.executable, "-m", "renio_cli.main", "weight", "--in", str(src),
                    "--out", str(out), "--overwrite"], check=True, stdout=subprocess.DEVNULL)
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    out.unlink()
    print(f"peak RSS of `renio weight` (CLI subprocess): {peak_kib / 2**20:.2f} GiB"
          + ("" if peak_kib > before else " (upper bound)"))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    main()
