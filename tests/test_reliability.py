"""What a run survives besides a kill: a full disk, damaged state, and being moved.

A full disk is real here: a small tmpfs mounted in a private mount namespace (``unshare``),
with the real CLI writing into it. Where namespaces cannot be made (an unprivileged
container), those tests skip with the reason; CI runs them as root.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from conftest import require_component

ROOT = Path(__file__).resolve().parents[1]
RENIO = [sys.executable, "-m", "renio_cli.main"]
CONFIG = ROOT / "sample_configs" / "toy-opd-renio.yaml"
ONE_STEP = ["prompts_per_iteration=8", "rollout.n=1", "eval_every=0", "rollout.max_new_tokens=48",
            "train.lr_schedule=linear"]


def _run(*args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([*RENIO, *map(str, args)], capture_output=True, text=True, **kw)


def _ok(*args) -> subprocess.CompletedProcess:
    proc = _run(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _killed_when(args: list[str], ready) -> None:
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not ready():
        time.sleep(0.005)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def _adapter(ckpt: Path) -> bytes:
    return (ckpt / "adapter_model.safetensors").read_bytes()


# Two iterations of one optimizer step each; every checkpoint keeps its trainer state, so an
# unfinished iteration 1 can be made again from iteration 0's.
TWO = ["iterations=2", *ONE_STEP, "keep_checkpoint_every=1"]


@pytest.fixture(scope="module")
def whole(tmp_path_factory, toy_world) -> Path:
    """A run of :data:`TWO` never killed, moved or damaged: the adapters to match."""
    run_dir = tmp_path_factory.mktemp("whole") / "run"
    _ok("run", "--config", CONFIG, f"run_dir={run_dir}", *TWO)
    return run_dir


# --------------------------------------------------------------------------------------------
# A run that moves
# --------------------------------------------------------------------------------------------


@pytest.mark.integration
def test_a_killed_run_copied_or_restored_from_tar_resumes_to_the_same_adapter(tmp_path, whole):
    """Killed inside iteration 1 of 2 (its rollouts and scores complete), then copied with
    `cp -r` (new paths, new mtimes) and, separately, put through tar (whole-second mtimes) and
    the original removed: both resume, reuse iteration 1's complete shards, and end with the
    adapters of a run that was never killed or moved."""
    common = TWO
    cut = tmp_path / "cut"
    _killed_when([*RENIO, "run", "--config", str(CONFIG), f"run_dir={cut}", *common],
                 lambda: (cut / "iter-00001" / "scores.parquet").exists())
    assert not (cut / "iter-00001" / "ckpt" / "adapter_model.safetensors").exists()
    archive = tmp_path / "cut.tar"
    with tarfile.open(archive, "w", format=tarfile.USTAR_FORMAT) as tar:  # whole-second mtimes
        tar.add(cut, arcname="cut")
    copied = tmp_path / "elsewhere" / "copied"
    copied.parent.mkdir()
    subprocess.run(["cp", "-r", str(cut), str(copied)], check=True)
    shutil.rmtree(cut)  # nothing may still be read from the old place
    restored_root = tmp_path / "restored"
    with tarfile.open(archive) as tar:
        tar.extractall(restored_root, filter="tar")
    restored = restored_root / "cut"
    assert (restored / "iter-00001" / "scores.parquet").stat().st_mtime_ns % 10**9 == 0

    for run_dir in (copied, restored):
        rollouts = run_dir / "iter-00001" / "rollouts.parquet"
        before = rollouts.read_bytes()
        done = _run("run", "--config", CONFIG, f"run_dir={run_dir}", *common)
        assert done.returncode == 0, done.stderr[-3000:]
        assert "iter 0: done earlier, skipped" in done.stderr
        assert rollouts.read_bytes() == before  # recognized as complete, not sampled again
        for i in range(2):
            ckpt = f"iter-{i:05d}/ckpt"
            assert _adapter(run_dir / ckpt) == _adapter(whole / ckpt), (run_dir, i)


@pytest.mark.integration
def test_an_evaluation_and_a_train_moved_with_their_inputs_are_recognized(tmp_path, whole,
                                                                          toy_world):
    """`renio eval` of a --bench file, and a `renio train --init-from` that saved a
    checkpoint, copied with `cp -r` (new paths and mtimes) together with their inputs and the
    original removed: the same eval reuses its complete per-sample file, and `renio train
    --resume` continues the checkpoint."""
    here = tmp_path / "here"
    here.mkdir()
    shutil.copyfile(toy_world.test_prompts, here / "bench.jsonl")
    shutil.copyfile(whole / "iter-00001" / "weights.parquet", here / "weights.parquet")
    shutil.copytree(whole / "iter-00001" / "ckpt", here / "init")

    def evaluate(where: Path) -> subprocess.CompletedProcess:
        return _ok("eval", "--model", "toy:student", "--bench", where / "bench.jsonl",
                   "--limit", "2", "--n", "1", "--max-new-tokens", "48",
                   "--out", where / "eval.parquet")

    def train(where: Path, *extra: str) -> subprocess.CompletedProcess:
        # The loop's optimizer settings (sample_configs/toy-opd-renio.yaml), as --init-from
        # requires.
        return _run("train", "--weights", where / "weights.parquet", "--model", "toy:student",
                    "--out", where / "out", "--max-steps", "1", "--lr", "0.0003",
                    "--lr-schedule", "linear", "--lora-r", "16", "--lora-alpha", "32", *extra)

    evaluate(here)
    first = train(here, "--init-from", str(here / "init"))
    assert first.returncode == 0, first.stderr[-3000:]
    made = (here / "eval.parquet").read_bytes()
    moved = tmp_path / "moved"
    subprocess.run(["cp", "-r", str(here), str(moved)], check=True)
    shutil.rmtree(here)
    again = evaluate(moved)
    assert "reused complete per-sample file" in again.stdout + again.stderr
    assert (moved / "eval.parquet").read_bytes() == made
    resumed = train(moved, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]


# --------------------------------------------------------------------------------------------
# A full disk
# --------------------------------------------------------------------------------------------


def _namespace_cmd() -> list[str]:
    """unshare for a private mount namespace: as root directly, else in a user namespace."""
    return ["unshare", "-m"] if os.geteuid() == 0 else ["unshare", "-rm"]


def _full_disk_or_skip(tmp_path: Path) -> None:
    reason = None
    if shutil.which("unshare") is None:
        reason = "no unshare (util-linux) to mount a small tmpfs in a private namespace"
    else:
        probe = subprocess.run([*_namespace_cmd(), "sh", "-c",
                                f"mount -t tmpfs -o size=64k tmpfs {tmp_path}"],
                               capture_output=True, text=True)
        if probe.returncode != 0:
            reason = ("cannot mount a tmpfs in a private mount namespace here "
                      f"({' '.join(probe.stderr.split())[:200]})")
    require_component("mount-namespace", reason)


def _on_small_disk(disk: Path, size_kb: int, script: str) -> subprocess.CompletedProcess:
    """``script`` (sh) with a ``size_kb`` tmpfs mounted on ``disk``, seen by nothing else."""
    disk.mkdir(parents=True, exist_ok=True)
    return subprocess.run([*_namespace_cmd(), "sh", "-c",
                           f"mount -t tmpfs -o size={size_kb}k tmpfs {disk} && {script}"],
                          capture_output=True, text=True, env={**os.environ, "COLUMNS": "400"})


@pytest.mark.integration
def test_full_disk_at_a_checkpoint_save_and_a_shard_write(tmp_path, toy_world):
    """A checkpoint save that runs out of room ends in one line naming --out, exit 2, and
    leaves --out as it was (absent), so the same command succeeds once space is freed. A
    shard write on a full disk names its file and leaves no .tmp behind."""
    _full_disk_or_skip(tmp_path)
    run_dir = tmp_path / "run"
    _ok("run", "--config", CONFIG, f"run_dir={run_dir}", "iterations=1", *ONE_STEP)
    it = run_dir / "iter-00000"
    disk = tmp_path / "disk"
    train = " ".join([*RENIO, "train", "--weights", str(it / "weights.parquet"), "--model",
                      "toy:student", "--teacher", "toy:teacher", "--lora-r", "16",
                      "--lora-alpha", "32", "--out", str(disk / "ckpt")])
    weight = " ".join([*RENIO, "weight", "--in", str(it / "scores.parquet"), "--out",
                       str(disk / "w.parquet")])
    report = tmp_path / "report"
    # The adapter (about 330 KB) fits in the 600 KB left, its trainer state (700 KB) does not.
    proc = _on_small_disk(disk, 2048, f"""
        head -c 1400k /dev/zero > {disk}/filler
        {train} > /dev/null 2> {report}.train1; echo $? > {report}.rc1
        ls -A {disk} > {report}.ls1
        rm {disk}/filler
        {train} > /dev/null 2> {report}.train2; echo $? > {report}.rc2
        ls -A {disk}/ckpt > {report}.ls2
        rm -r {disk}/ckpt; head -c 2040k /dev/zero > {disk}/filler 2>/dev/null
        {weight} > /dev/null 2> {report}.weight; echo $? > {report}.rc3
        ls -A {disk} > {report}.ls3
    """)
    assert proc.returncode == 0, proc.stderr
    read = lambda suffix: Path(f"{report}.{suffix}").read_text()  # noqa: E731
    assert read("rc1").strip() == "2", read("train1")
    assert read("train1").strip().splitlines() == [
        f"error: {disk / 'ckpt'}: cannot write: No space left on device"]
    assert read("ls1").split() == ["filler"]  # --out as before: nothing
    assert read("rc2").strip() == "0", read("train2")
    assert {"adapter_model.safetensors", "trainer_state.pt"} <= set(read("ls2").split())
    assert read("rc3").strip() == "2", read("weight")
    assert read("weight").strip().splitlines() == [
        f"error: {disk / 'w.parquet'}: cannot write: No space left on device"]
    assert read("ls3").split() == ["filler"]  # no w.parquet.tmp, no lock file


@pytest.mark.integration
def test_full_disk_at_rollout_and_score_outputs(tmp_path, toy_world):
    """`renio rollout` and `renio score` writing into a full disk end in one line that names
    the output file, exit 2, and leave nothing behind (no 0-byte .parquet.tmp)."""
    _full_disk_or_skip(tmp_path)
    run_dir = tmp_path / "run"
    _ok("run", "--config", CONFIG, f"run_dir={run_dir}", "iterations=1", *ONE_STEP)
    it = run_dir / "iter-00000"
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "problem": f"{i}+{i}=",
                                           "answer": str(2 * i)}) + "\n" for i in range(4)))
    disk = tmp_path / "disk"
    rollout = " ".join([*RENIO, "rollout", "--model", "toy:student", "--prompts", str(prompts),
                        "--max-new-tokens", "16", "--out", str(disk / "r.parquet")])
    score = " ".join([*RENIO, "score", "--in", str(it / "rollouts.parquet"), "--teacher",
                      "toy:teacher", "--out", str(disk / "s.parquet")])
    report = tmp_path / "report"
    # The disk is filled to its last byte before either command writes.
    proc = _on_small_disk(disk, 256, f"""
        head -c 300k /dev/zero > {disk}/filler 2>/dev/null
        {rollout} > /dev/null 2> {report}.rollout; echo $? > {report}.rc1
        {score} > /dev/null 2> {report}.score; echo $? > {report}.rc2
        ls -A {disk} > {report}.ls
    """)
    assert proc.returncode == 0, proc.stderr
    read = lambda suffix: Path(f"{report}.{suffix}").read_text()  # noqa: E731
    for name, rc, out in (("rollout", "rc1", "r.parquet"), ("score", "rc2", "s.parquet")):
        assert read(rc).strip() == "2", read(name)
        assert read(name).strip().splitlines() == [
            f"error: {disk / out}: cannot write: No space left on device"], name
    assert read("ls").split() == ["filler"]  # no .tmp, no lock file, no part directory


# --------------------------------------------------------------------------------------------
# Damaged state
# --------------------------------------------------------------------------------------------


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.integration
def test_damaged_checkpoint_files_and_a_cut_metrics_line(tmp_path, toy_world):
    """A finished run's checkpoint records the sha256 of its files: a rerun and `renio eval
    --adapter` refuse a damaged one in one line naming the file; a truncated trainer state is
    named when the next iteration continues from it; a metrics.jsonl whose last line was cut
    short is the unfinished iteration's, and the rerun completes it."""
    run_dir = tmp_path / "run"
    common = ["prompts_per_iteration=8", "rollout.n=1", "eval_every=0",
              "rollout.max_new_tokens=48"]
    args = ["run", "--config", CONFIG, f"run_dir={run_dir}", *common]
    _ok(*args, "iterations=1")
    ckpt = run_dir / "iter-00000" / "ckpt"
    sums = json.loads((ckpt / "checksums.json").read_text())
    assert {"adapter_model.safetensors", "trainer_state.pt", "train_config.json"} <= set(sums)

    adapter = ckpt / "adapter_model.safetensors"
    good = adapter.read_bytes()
    _truncate(adapter)
    for proc in (_run(*args, "iterations=1"),
                 _run("eval", "--model", "toy:student", "--adapter", ckpt, "--bench", "toy",
                      "--out", tmp_path / "eval.parquet", "--limit", "2")):
        assert proc.returncode == 2, proc.stderr[-2000:]
        (line,) = proc.stderr.strip().splitlines()[-1:]
        assert f"{adapter}: damaged" in line and "sha256" in line, proc.stderr
        assert "Traceback" not in proc.stderr
    adapter.write_bytes(good)

    metrics = run_dir / "metrics.jsonl"
    whole = metrics.read_text()
    metrics.write_text(whole[: len(whole) // 2])  # a kill or a full disk mid-line
    done = _ok(*args, "iterations=1")
    assert "checkpoint already complete" in done.stderr
    assert json.loads(metrics.read_text())["iteration"] == 0

    state = ckpt / "trainer_state.pt"
    _truncate(state)
    proc = _run(*args, "iterations=2")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: {state}: damaged"), proc.stderr


def _unfinished_iteration_1(whole: Path, run_dir: Path) -> None:
    """``whole`` as a kill in iteration 1's train stage leaves it: iteration 1's shards, no
    checkpoint of its own and no metrics line."""
    shutil.copytree(whole, run_dir)
    shutil.rmtree(run_dir / "iter-00001" / "ckpt")
    metrics = run_dir / "metrics.jsonl"
    first = metrics.read_text().splitlines()[0]
    assert json.loads(first)["iteration"] == 0
    metrics.write_text(first + "\n")


def _garble_footer(path: Path) -> None:
    """Overwrite the first half of the Parquet footer (its thrift-encoded metadata), keeping
    the file's length and its magic bytes."""
    data = bytearray(path.read_bytes())
    footer = int.from_bytes(data[-8:-4], "little")
    start = len(data) - 8 - footer
    data[start:start + footer // 2] = b"\xff" * (footer // 2)
    path.write_bytes(bytes(data))


def _without_metadata(path: Path) -> None:
    import pyarrow.parquet as pq

    pq.write_table(pq.read_table(path).replace_schema_metadata(None), path)


@pytest.mark.integration
@pytest.mark.parametrize("name, damage, said", [
    ("rollouts.parquet", _truncate, "cannot be read as Parquet"),
    ("scores.parquet", _garble_footer, "cannot be read as Parquet"),
    ("weights.parquet", _without_metadata, "holds no renio metadata"),
    ("weights.parquet", "iteration 0's", None),
], ids=["rollouts-cut-short", "scores-footer-garbled", "weights-no-metadata",
        "weights-of-iteration-0"])
def test_a_damaged_shard_of_an_unfinished_iteration_is_made_again(tmp_path, whole, name,
                                                                  damage, said):
    """The same command makes a shard of the unfinished iteration that is not its complete
    output again (cut short, a garbled footer, no renio metadata, another iteration's), says
    so where the file shows it, and ends with the adapter of an undamaged run."""
    run_dir = tmp_path / "run"
    _unfinished_iteration_1(whole, run_dir)
    shard = run_dir / "iter-00001" / name
    if callable(damage):
        damage(shard)
    else:
        shutil.copyfile(run_dir / "iter-00000" / name, shard)
    done = _ok("run", "--config", CONFIG, f"run_dir={run_dir}", *TWO)
    if said is not None:
        # The log wraps long lines at spaces.
        assert f"iter 1: {shard} {said}" in " ".join(done.stderr.split()), done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    ckpt = "iter-00001/ckpt"
    assert _adapter(run_dir / ckpt) == _adapter(whole / ckpt)


@pytest.mark.integration
def test_a_damaged_newest_checkpoint_says_how_to_resume_from_the_one_before(tmp_path, whole):
    """A damaged newest checkpoint (trainer state or adapter) with an intact one before it:
    the line names the file and the folder to delete; deleting it, the same command redoes
    that iteration from the checkpoint before and ends with the undamaged run's adapter."""
    run_dir = tmp_path / "run"
    shutil.copytree(whole, run_dir)
    folder = run_dir / "iter-00001"
    advice = f"delete {folder} to redo iteration 1 from iteration 0's checkpoint"
    adapter = folder / "ckpt" / "adapter_model.safetensors"
    good = adapter.read_bytes()
    for damaged, more in ((folder / "ckpt" / "trainer_state.pt", "iterations=2"),
                          (adapter, "iterations=3")):
        kept = damaged.read_bytes()
        _truncate(damaged)
        proc = _run("run", "--config", CONFIG, f"run_dir={run_dir}", *TWO, more)
        assert proc.returncode == 2, proc.stderr[-3000:]
        line = proc.stderr.strip().splitlines()[-1]
        assert line.startswith(f"error: {damaged}: damaged"), proc.stderr[-3000:]
        assert line.endswith(advice), line
        if damaged != adapter:
            damaged.write_bytes(kept)
    shutil.rmtree(folder)
    _ok("run", "--config", CONFIG, f"run_dir={run_dir}", *TWO)
    assert _adapter(folder / "ckpt") == good
