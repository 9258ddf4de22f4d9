"""The benchmarks' own measuring code: bench_peer's per-child peak memory, and the GPU check's
behaviour on a machine without a GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MiB = 1024 * 1024

# A child that fills `extra` MiB (every page written, so it is resident) and reports its peak
# the way bench_peer's children do.
CHILD = """
import json, sys
sys.path.insert(0, {bench!r})
from bench_peer import own_peak_mib
extra = bytearray(b"\\x01") * ({extra} * 1024 * 1024)
print(json.dumps(own_peak_mib()))
"""


def _child_peak(extra_mib: int) -> float:
    code = CHILD.format(bench=str(ROOT / "benchmarks"), extra=extra_mib)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads Linux's /proc")
def test_bench_peer_child_peak_is_its_own_while_the_parent_is_large():
    # The parent holds 700 MiB of written pages while it starts both children, as bench_peer's
    # parent holds torch and the models.
    ballast = bytearray(b"\x02") * (700 * MiB)
    assert _rss_mib() > 700
    small, large = _child_peak(0), _child_peak(200)
    del ballast
    # 200 MiB more reported as at least 200 MB (190.7 MiB) more: the larger child's allocator
    # reuses the few pages that both interpreters' start-up freed.
    assert large - small >= 200e6 / MiB, (small, large)
    # A bare interpreter is tens of MiB: neither child may carry the parent's 700.
    assert small < 200, small


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="the no-GPU path")
def test_gpu_check_without_a_gpu_says_so_and_exits_0(tmp_path):
    # This interpreter's torch sees no CUDA device: one line, exit 0, no report written.
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path)}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], env=env,
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu_check: no GPU ("), proc.stdout
    assert "CUDA devices: 0" in lines[0] and "exiting 0" in lines[0]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.integration
def test_bench_peer_renio_child_runs_the_loop(tmp_path):
    """The renio side of bench_peer on its own: the loop it times must run at this code (the
    benchmark's timing hook wraps one of the loop's methods, whose signature can change)."""
    work = tmp_path / "work"
    code = f"""
import json, sys
from pathlib import Path
sys.path.insert(0, {str(ROOT / 'benchmarks')!r})
import bench_peer
student, teacher, problems = bench_peer.build_models(Path({str(tmp_path / 'models')!r}),
                                                     bench_peer.CASES[1]["vocab"])
pfile = Path({str(tmp_path / 'problems.json')!r})
pfile.write_text(json.dumps(problems))
r = bench_peer.run_child("renio", student, teacher, pfile, Path({str(work)!r}), 2, 8, "cpu")
print(json.dumps({{"steps": len(r["step_seconds"]), "peak": r.get("peak_mib")}}))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["steps"] == 2  # one time per optimizer step
