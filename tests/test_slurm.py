"""examples/slurm/ on a real single-node Slurm (slurmctld + slurmd + munged, .ci/slurm-up.sh).

Submits the example job-array pipeline on a quick toy world and checks what a cluster user
relies on: sharded array outputs equal an unsharded run row for row; an array task cancelled
mid-run and resubmitted ends with the same output; the weight job starts only after the whole
score array has ended. Skips where Slurm is not installed or we are not root (the daemons run
as root), unless ``RENIO_REQUIRE`` names ``slurm`` (CI), where that is a failure.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import skip_or_fail

from renio_core.modeling.toy.build import build_toy_world

REPO = Path(__file__).resolve().parents[1]
SLURM_DIR = REPO / "examples" / "slurm"
pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def slurm():
    missing = [b for b in ("slurmctld", "slurmd", "munged", "sbatch") if shutil.which(b) is None]
    if missing:
        skip_or_fail("slurm", f"Slurm is not installed ({', '.join(missing)} missing; "
                              "apt-get install slurm-wlm munge)")
    if os.geteuid() != 0:
        skip_or_fail("slurm", "the test Slurm runs its daemons as root")
    up = subprocess.run([str(REPO / ".ci" / "slurm-up.sh")], capture_output=True, text=True)
    if up.returncode != 0:
        pytest.fail(f"Slurm did not start: {up.stdout}{up.stderr}")
    try:
        yield
    finally:
        subprocess.run([str(REPO / ".ci" / "slurm-down.sh")], check=False)


def _env(tmp: Path, world, prompts: Path) -> dict[str, str]:
    return {
        **os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
        "RENIO_SLURM_DIR": str(SLURM_DIR), "WORK": str(tmp / "work"),
        "STUDENT": str(world.student), "TEACHER": str(world.teacher),
        "PROMPTS": str(prompts), "EVAL_BENCH": str(prompts), "SHARDS": "2", "TRAIN_GPUS": "1",
        "RENIO": f"{sys.executable} -m renio_cli.main",
        "ROLLOUT_ARGS": "--n 2 --max-new-tokens 24 --chunk-prompts 2",
        "SCORE_ARGS": "--rows-per-part 4", "WEIGHT_ARGS": "--clip 2.0 --threshold 1.0",
        "TRAIN_ARGS": "--max-steps 2 --lr 1e-3 --lora-r 4 --lora-alpha 8",
        "EVAL_ARGS": "--n 1 --max-new-tokens 24 --limit 2",
        "SBATCH_ARGS": "", "GPU_ARGS": "",
    }


def _show_jobs(ids: list[str]) -> dict[str, str]:
    """JobId -> the one-line ``scontrol show job`` record of every task of the given jobs
    (array tasks one by one)."""
    out = subprocess.run(["scontrol", "-o", "show", "job"], capture_output=True,
                         text=True).stdout
    found = {}
    for ln in out.splitlines():
        job = re.search(r"JobId=(\d+)", ln)
        array = re.search(r"ArrayJobId=(\d+)", ln)
        if job and (job.group(1) in ids or (array and array.group(1) in ids)):
            found[job.group(1)] = ln
    return found


def _job_states(ids: list[str]) -> dict[str, str]:
    return {j: re.search(r"JobState=(\S+)", ln).group(1) for j, ln in _show_jobs(ids).items()}


def _wait(ids: list[str], timeout: float = 300) -> dict[str, str]:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        states = _job_states(ids)
        if states and all(s not in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING")
                          for s in states.values()):
            return states
        time.sleep(1)
    subprocess.run(["scancel", *ids], check=False)
    pytest.fail(f"jobs {ids} did not finish in {timeout}s: {_job_states(ids)}")


def _rows(path: Path):
    table = pq.read_table(path) if path.is_file() else pq.ParquetDataset(path).read()
    return table.replace_schema_metadata(None).sort_by(
        [("prompt_id", "ascending"), ("sample_index", "ascending")])


def _cli(env: dict[str, str], *args: str) -> None:
    res = subprocess.run([sys.executable, "-m", "renio_cli.main", *args], env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]


def _times(path: Path) -> dict[str, float]:
    return {k: float(v) for k, v in (ln.split() for ln in path.read_text().splitlines())}


def test_job_array_pipeline_on_slurm(slurm, tmp_path: Path) -> None:
    world = build_toy_world(tmp_path / "world", seed=0, quick=True)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(world.train_prompts.read_text().splitlines(True)[:8]))
    env = _env(tmp_path, world, prompts)

    res = subprocess.run([str(SLURM_DIR / "submit.sh")], env=env, capture_output=True,
                         text=True, check=True)
    ids = dict(kv.split("=") for kv in res.stdout.split())
    states = _wait(list(ids.values()))
    it = tmp_path / "work" / "iter-00000"
    logs = "\n".join(p.read_text()[-1500:] for p in sorted((it / "logs").glob("*.out")))
    assert set(states.values()) == {"COMPLETED"}, f"{states}\n{logs}"
    # Two tasks per array, one job each for weight, train, eval.
    assert len(states) == 2 + 2 + 3

    # The unsharded reference, run directly.
    ref = tmp_path / "ref"
    _cli(env, "rollout", "--model", str(world.student), "--prompts", str(prompts), "--out",
         str(ref / "rollouts"), "--grade", "--seed", "0", "--policy-step", "0", "--n", "2",
         "--max-new-tokens", "24", "--chunk-prompts", "2")
    _cli(env, "score", "--in", str(ref / "rollouts"), "--teacher", str(world.teacher),
         "--out", str(ref / "scores"), "--rows-per-part", "4")
    _cli(env, "weight", "--in", str(ref / "scores"), "--out", str(ref / "weights.parquet"),
         "--clip", "2.0", "--threshold", "1.0")
    for name in ("rollouts", "scores", "weights.parquet"):
        sharded, single = _rows(it / name), _rows(ref / name)
        assert sharded.num_rows == 16
        assert sharded.equals(single), name
    assert len(list((it / "rollouts").glob("part-*.parquet"))) == 4  # 8 prompts / 2 per part
    assert (it / "ckpt" / "adapter_model.safetensors").is_file()
    assert (it / "eval.json").is_file()

    # The weight job started only after every score task had ended: the timestamps the jobs
    # wrote, and Slurm's own start/end times.
    score_end = max(_times(it / f"score.{k}.times")["end"] for k in range(2))
    assert _times(it / "weight.times")["start"] >= score_end
    t = {jid: (re.search(r"StartTime=(\S+)", ln).group(1), re.search(r"EndTime=(\S+)", ln).group(1))
         for jid, ln in _show_jobs([ids["score"], ids["weight"]]).items()}
    assert t[ids["weight"]][0] >= max(end for jid, (_, end) in t.items() if jid != ids["weight"])

    # Cancel one rollout array task mid-run, then resubmit the array: the cancelled shard is
    # redone (its half-written part never read as complete), the finished one is skipped, and
    # the output equals the unsharded run.
    again = tmp_path / "again"
    again.mkdir()
    env2 = {**env, "IT_DIR": str(again), "ADAPTER": "",
            "ROLLOUT_ARGS": "--n 2 --max-new-tokens 24 --chunk-prompts 2"}

    def submit_rollouts() -> str:
        return subprocess.run(["sbatch", "--parsable", "--array=0-1", f"--chdir={again}",
                               str(SLURM_DIR / "rollout.sbatch")], env=env2, capture_output=True,
                              text=True, check=True).stdout.strip()

    def cancel_victim(wait_for_output: bool) -> dict:
        first = submit_rollouts()
        end = time.monotonic() + 120
        while not (again / "rollout.0.times").exists() and time.monotonic() < end:
            time.sleep(0.2)
        # Let it load the models and start writing, then kill it before it ends.
        while (wait_for_output and time.monotonic() < end
               and not list((again / "rollouts").glob("*.tmp"))
               and not list((again / "rollouts").glob("part-00000.parquet"))):
            time.sleep(0.05)
        subprocess.run(["scancel", f"{first}_0"], check=True)
        return _wait([first])

    states = cancel_victim(wait_for_output=True)
    if "CANCELLED" not in states.values():
        # The machine was so slow to deliver the kill that the victim finished first: start
        # over and kill it while it is still loading the models.
        shutil.rmtree(again)
        again.mkdir()
        states = cancel_victim(wait_for_output=False)
    assert "CANCELLED" in states.values(), states
    assert "end" not in _times(again / "rollout.0.times")  # killed before it finished
    # How far the victim got before the kill landed depends on the load (on a busy CI machine
    # it once wrote both of its parts, 0 and 2, and died before its last line). Whatever is
    # there must be complete Parquet; a part still at ``.tmp`` is redone below.
    for part in (again / "rollouts").glob("part-*.parquet"):
        assert _rows(part).num_rows == 4, part
    kept = {p.name: p.stat().st_mtime_ns for p in (again / "rollouts").glob("part-*.parquet")}
    second = submit_rollouts()
    assert set(_wait([second]).values()) == {"COMPLETED"}
    # Parts that were complete before the resubmission were skipped, not rewritten.
    for name, mtime in kept.items():
        assert (again / "rollouts" / name).stat().st_mtime_ns == mtime, name
    assert not list((again / "rollouts").glob("*.tmp"))
    assert _rows(again / "rollouts").equals(_rows(ref / "rollouts"))
