"""renio rollout: sampling exactness, determinism, sharding, resuming, validation."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pytest
import torch
from tiny_models import toy_subset, write_prompts

from renio_core.backends.hf import generate_batch
from renio_core.data import shards
from renio_core.data.prompt_io import load_prompts
from renio_core.errors import RenioInputError
from renio_core.formulas.sampling import row_seed, row_uniforms, sample_tokens
from renio_core.modeling import models
from renio_core.stages.rollout import RolloutConfig, run_rollout

KEY = ["prompt_id", "sample_index"]
ROW_COLS = ["prompt_id", "sample_index", "prompt_ids", "completion_ids", "completion_text",
            "finish_reason"]


@pytest.fixture(scope="module")
def world(toy_world, tmp_path_factory):
    return toy_subset(toy_world, tmp_path_factory.mktemp("rollout_world"))


def cfg_for(world, out, **kw):
    base = dict(model=world["student"], prompts=world["prompts"], out=str(out), n=2,
                max_new_tokens=12, chunk_prompts=3, batch_size=5, dtype="float32",
                device="cpu")
    base.update(kw)
    return RolloutConfig(**base)


def rows_by_key(spec):
    table = shards.read_table(spec, columns=ROW_COLS)
    return {(r["prompt_id"], r["sample_index"]): r for r in table.to_pylist()}


# ---------------------------------------------------------------------------- pure sampling


def test_sample_tokens_hand_computed():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    # top_p 0.7 keeps tokens 0 and 1 (0.5 before token 1 < 0.7; 0.8 before token 2 >= 0.7),
    # renormalized to 0.625 / 0.375.
    for u, want in [(0.0, 0), (0.6249, 0), (0.6251, 1), (0.999, 1)]:
        got = sample_tokens(logits, torch.tensor([u], dtype=torch.float64), temperature=1.0,
                            top_k=0, top_p=0.7)
        assert got.tolist() == [want], u
    # top_k 3 then no top_p: 0.5/0.95, 0.3/0.95, 0.15/0.95
    got = sample_tokens(logits, torch.tensor([0.9], dtype=torch.float64), temperature=1.0,
                        top_k=3, top_p=1.0)
    assert got.tolist() == [2]  # cdf 0.526, 0.842, 1.0
    # top_k 1 and temperature 0 are greedy whatever the uniform.
    assert sample_tokens(logits, torch.tensor([0.99], dtype=torch.float64), temperature=1.0,
                         top_k=1, top_p=1.0).tolist() == [0]
    assert sample_tokens(logits, torch.tensor([0.99], dtype=torch.float64), temperature=0.0,
                         top_k=0, top_p=1.0).tolist() == [0]


def test_sample_tokens_frequencies_match_tempered_softmax():
    torch.manual_seed(0)
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, 0.5])
    T = 1.3
    n = 40000
    u = torch.rand(n, dtype=torch.float64)
    toks = sample_tokens(logits.expand(n, -1), u, temperature=T, top_k=0, top_p=1.0)
    freq = torch.bincount(toks, minlength=5).double() / n
    want = torch.softmax(logits.double() / T, dim=-1)
    assert torch.allclose(freq, want, atol=0.01)


def test_row_seed_is_stable_and_distinct():
    assert row_seed(0, "a", 0) == row_seed(0, "a", 0)
    assert len({row_seed(0, "a", 0), row_seed(0, "a", 1), row_seed(1, "a", 0),
                row_seed(0, "b", 0)}) == 4
    assert torch.equal(row_uniforms(5, 8), row_uniforms(5, 8))


# ---------------------------------------------------------------------------- HF loop


def test_greedy_batch_equals_model_generate(world):
    """Left padding, positions and dropping finished rows from the cache change nothing."""
    model = models.load_model(world["student"], dtype="float32", device="cpu")
    tok = models.load_tokenizer(world["student"])
    eos = models.eos_token_ids(model, tok)
    prompts = [tok("12+34=")["input_ids"], tok("5")["input_ids"], tok("999+1 is")["input_ids"]]
    u = torch.zeros(3, 16, dtype=torch.float64)
    outs = generate_batch(model, prompts, u, eos_ids=eos, pad_id=tok.pad_token_id,
                          temperature=0.0, top_k=0, top_p=1.0, max_new_tokens=16)
    for p, o in zip(prompts, outs):
        ref = model.generate(torch.tensor([p]), do_sample=False, max_new_tokens=16,
                             eos_token_id=eos, pad_token_id=tok.pad_token_id)[0, len(p):]
        ref = ref.tolist()
        if any(t in eos for t in ref):
            ref = ref[: next(i for i, t in enumerate(ref) if t in eos) + 1]
        assert o.ids == ref
        assert o.finish_reason == ("stop" if o.ids[-1] in eos else "length")


def test_rollout_rows_follow_the_contract(world, tmp_path):
    cfg = cfg_for(world, tmp_path / "r.parquet", grade=True)
    summary = run_rollout(cfg)
    table = shards.read_table(cfg.out)
    assert table.num_rows == 12 * 2 == summary.rows
    assert table.schema.field("sample_index").type == pa.int32()
    assert table.schema.field("completion_ids").type == pa.list_(pa.int32())
    tok = models.load_tokenizer(world["student"])
    eos = models.eos_token_ids(models.load_model(world["student"]), tok)
    for r in table.to_pylist():
        assert r["finish_reason"] in ("stop", "length")
        if r["finish_reason"] == "stop":
            assert r["completion_ids"][-1] in eos
            assert not any(t in eos for t in r["completion_ids"][:-1])
        else:
            assert len(r["completion_ids"]) == cfg.max_new_tokens
        assert r["correct"] is not None  # graded (math, answer present)
        assert r["policy_step"] == 0 and r["task"] == "math"
    meta = shards.read_metadata(Path(cfg.out))
    assert meta["stage"] == "rollout" and meta["config"]["temperature"] == 1.1
    assert meta["tokenizer_fingerprint"] == models.tokenizer_fingerprint(tok)
    assert not Path(str(cfg.out) + ".parts").exists()  # staging merged and removed


def test_one_chunk_is_written_in_place_and_equals_merged_chunks(world, tmp_path):
    """A single-file output of one chunk is written straight to its file (no staging copy);
    it holds what the staged-and-merged output of four chunks holds, with the same metadata
    but for the chunking setting, and a rerun skips it."""
    one = cfg_for(world, tmp_path / "one.parquet", chunk_prompts=12)
    four = cfg_for(world, tmp_path / "four.parquet", chunk_prompts=3)
    run_rollout(one), run_rollout(four)
    assert shards.read_table(one.out).equals(shards.read_table(four.out))
    a, b = shards.read_metadata(Path(one.out)), shards.read_metadata(Path(four.out))
    assert "part" not in a and "part" not in b and a["stage"] == b["stage"] == "rollout"
    assert a["config"]["chunk_prompts"] == 12 and b["config"]["chunk_prompts"] == 3
    assert not any(p.name.endswith((".parts", ".tmp")) for p in tmp_path.iterdir())
    again = run_rollout(one)
    assert again.parts_skipped == 1 and again.parts_written == 0


def test_same_seed_same_tokens_other_seed_differs(world, tmp_path):
    # A hot, unfiltered sampler: the trained toy student is near-deterministic otherwise.
    hot = dict(temperature=2.0, top_p=1.0, top_k=0)
    a = run_rollout(cfg_for(world, tmp_path / "a", seed=7, **hot)).out
    b = run_rollout(cfg_for(world, tmp_path / "b", seed=7, **hot)).out
    c = run_rollout(cfg_for(world, tmp_path / "c", seed=8, **hot)).out
    ra, rb, rc = rows_by_key(a), rows_by_key(b), rows_by_key(c)
    assert ra == rb
    assert any(ra[k]["completion_ids"] != rc[k]["completion_ids"] for k in ra)


def test_four_shards_equal_one_run(world, tmp_path):
    # A hot sampler, so every row depends on its seed: with the default settings the trained
    # toy student is near-greedy and two seeds differ in 0-1 of 24 rows, which would let a
    # shard that seeds its rows differently pass.
    hot = dict(temperature=2.0, top_p=1.0, top_k=0, seed=7)
    whole = rows_by_key(run_rollout(cfg_for(world, tmp_path / "whole", **hot)).out)
    other = rows_by_key(run_rollout(cfg_for(world, tmp_path / "other", **{**hot, "seed": 8})).out)
    changed = sum(whole[k]["completion_ids"] != other[k]["completion_ids"] for k in whole)
    assert changed > 0.75 * len(whole), f"only {changed} of {len(whole)} rows depend on the seed"
    for i in range(4):
        run_rollout(cfg_for(world, tmp_path / "sharded", shard=f"{i}/4", **hot))
    parts = sorted(p.name for p in (tmp_path / "sharded").iterdir())
    assert parts == [f"part-{k:05d}.parquet" for k in range(4)]
    sharded = shards.read_table(tmp_path / "sharded", columns=ROW_COLS).to_pylist()
    assert len(sharded) == len(whole)  # no row twice
    assert {(r["prompt_id"], r["sample_index"]): r for r in sharded} == whole


def test_rerun_skips_complete_parts_and_refuses_other_config(world, tmp_path):
    cfg = cfg_for(world, tmp_path / "d")
    first = run_rollout(cfg)
    again = run_rollout(cfg)
    assert (first.parts_written, again.parts_written, again.parts_skipped) == (4, 0, 4)
    with pytest.raises(RenioInputError, match="different config"):
        run_rollout(cfg_for(world, tmp_path / "d", temperature=0.5))


def test_bad_inputs_write_nothing(world, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "x", "question": "1+1"}) + "\n")
    with pytest.raises(RenioInputError, match="problem"):
        run_rollout(cfg_for(world, tmp_path / "o1", prompts=str(bad)))
    dup = tmp_path / "dup.jsonl"
    dup.write_text("\n".join(json.dumps({"id": "a", "problem": "p"}) for _ in range(2)))
    with pytest.raises(RenioInputError, match="row 1.*duplicate id"):
        load_prompts(dup)
    code = write_prompts(tmp_path / "code.jsonl", 2, task="code")
    with pytest.raises(RenioInputError, match="math answers only; code is graded by running it"):
        run_rollout(cfg_for(world, tmp_path / "o2", prompts=str(code), grade=True))
    with pytest.raises(RenioInputError, match="--shard"):
        cfg_for(world, tmp_path / "o3", shard="4/4")
    with pytest.raises(RenioInputError, match="directory --out"):
        run_rollout(cfg_for(world, tmp_path / "o4.parquet", shard="1/2"))
    with pytest.raises(RenioInputError, match="--top-p"):
        cfg_for(world, tmp_path / "o5", top_p=0)
    assert not any(p.name.startswith("o") for p in tmp_path.iterdir())


def test_prompts_from_parquet_and_default_ids(tmp_path):
    table = pa.table({"problem": ["1+1", "2+2"], "answer": [2, 4]})
    import pyarrow.parquet as pq

    pq.write_table(table, tmp_path / "p.parquet")
    ps = load_prompts(tmp_path / "p.parquet")
    assert [p.id for p in ps.prompts] == ["0", "1"]
    assert ps.prompts[1].answer == "4"


# ---------------------------------------------------------------------------- real CLI


def _cli(*args, **kw):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "renio_cli.main", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            **kw)


@pytest.mark.integration
def test_cli_sigkill_then_rerun_completes(world, tmp_path):
    prompts = write_prompts(tmp_path / "many.jsonl", 12)
    out = tmp_path / "killed"
    args = ["rollout", "--model", world["student"], "--prompts", str(prompts), "--out",
            str(out), "--n", "2", "--max-new-tokens", "32", "--chunk-prompts", "1",
            "--batch-size", "2", "--dtype", "float32", "--device", "cpu"]
    proc = _cli(*args)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "part-00001.parquet").exists():
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = len(list(out.glob("part-*.parquet")))
    assert 0 < done_before < 12, "the kill should land mid-run"
    proc = _cli(*args)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    assert "already complete" in stdout
    assert not list(out.glob("*.tmp"))
    rows = shards.read_table(out, columns=KEY).to_pylist()
    keys = [(r["prompt_id"], r["sample_index"]) for r in rows]
    assert len(keys) == len(set(keys)) == 24
    # Same rows as an uninterrupted run.
    ref = run_rollout(RolloutConfig(model=world["student"], prompts=str(prompts),
                                    out=str(tmp_path / "ref"), n=2, max_new_tokens=32,
                                    chunk_prompts=1, dtype="float32", device="cpu"))
    assert rows_by_key(out) == rows_by_key(ref.out)


def test_cli_bad_input_is_one_line_exit_2(world, tmp_path):
    proc = _cli("rollout", "--model", world["student"], "--prompts", str(tmp_path / "no.jsonl"),
                "--out", str(tmp_path / "o.parquet"))
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert len(stderr.strip().splitlines()) == 1 and "no such file" in stderr
    assert not (tmp_path / "o.parquet").exists()


def test_vllm_backend_without_vllm_is_a_clear_error(world, tmp_path):
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed here (tests/test_vllm_backend.py runs it)")
    with pytest.raises(RenioInputError, match="--backend vllm needs"):
        run_rollout(cfg_for(world, tmp_path / "v.parquet", backend="vllm"))
    assert not list(tmp_path.iterdir())


def test_parse_shard_and_ownership():
    from renio_core.data.chunked_output import Shard, owned_chunks, parse_shard

    assert parse_shard("2/4") == Shard(2, 4) and parse_shard(None) == Shard(0, 1)
    for bad in ("4/4", "1/0", "x", "-1/2", "1/2/3"):
        with pytest.raises(RenioInputError, match="--shard"):
            parse_shard(bad)
    # Every chunk belongs to exactly one of N shards.
    owned = [k for i in range(3) for k in owned_chunks(Shard(i, 3), 10)]
    assert sorted(owned) == list(range(10))


# ---------------------------------------------------------------------------- refilling rows


def test_cli_refill_rows_equal_rows_sampled_alone(world, tmp_path):
    """A hot sampler makes lengths uneven (some rows stop after a few tokens, others run to
    the limit), so the 4 slots are refilled many times; ``--refill`` must give every row the
    tokens it gets sampled alone (``--batch-size 1``: no padding, no splicing), and say which
    sampler ran. Fixed batches of 4 are not the reference: their padding changes the logits'
    last bits, which flips one token of one of these rows."""
    args = ["rollout", "--model", world["student"], "--prompts", world["prompts"], "--n", "3",
            "--max-new-tokens", "24", "--temperature", "2.0", "--top-p", "1", "--top-k", "0",
            "--seed", "3", "--dtype", "float32", "--device", "cpu"]
    outs = {}
    for name, extra in (("fixed", ["--batch-size", "1"]),
                        ("refill", ["--batch-size", "4", "--refill"])):
        outs[name] = tmp_path / f"{name}.parquet"
        proc = subprocess.run([sys.executable, "-m", "renio_cli.main", *args, "--out",
                               str(outs[name]), *extra], capture_output=True, text=True,
                              timeout=600, env=dict(os.environ, COLUMNS="200"))
        assert proc.returncode == 0, proc.stderr
        sampler = re.search(r"│ sampler +│ +(.+?) │", proc.stdout)
        want = "refilled batches" if name == "refill" else "fixed batches"
        assert sampler and sampler.group(1) == want, proc.stdout
    fixed = shards.read_table(outs["fixed"]).to_pylist()
    refilled = shards.read_table(outs["refill"]).to_pylist()
    lengths = sorted(len(r["completion_ids"]) for r in fixed)
    assert len(fixed) == 36 and lengths[0] * 3 < lengths[-1]  # really uneven
    assert [r["finish_reason"] for r in fixed].count("stop") >= 4
    assert [(r["prompt_id"], r["sample_index"]) for r in fixed] == \
        [(r["prompt_id"], r["sample_index"]) for r in refilled]
    for a, b in zip(fixed, refilled):
        assert a["completion_ids"] == b["completion_ids"]
        assert a["finish_reason"] == b["finish_reason"]
    meta = shards.read_metadata(outs["refill"])
    assert shards.find_in_lineage(meta, "config", "refill") is True


def test_refill_greedy_equals_model_generate(world):
    """Five prompts of different lengths through two slots: each row equals generate alone."""
    from renio_core.backends.hf import generate_refill

    model = models.load_model(world["student"], dtype="float32", device="cpu")
    tok = models.load_tokenizer(world["student"])
    eos = models.eos_token_ids(model, tok)
    texts = ["12+34=", "5", "999+1 is", "7*8=", "1+1+1+1+1+1="]
    prompts = [tok(t)["input_ids"] for t in texts]
    u = torch.zeros(len(prompts), 16, dtype=torch.float64)
    outs = generate_refill(model, prompts, u, eos_ids=eos, pad_id=tok.pad_token_id,
                           temperature=0.0, top_k=0, top_p=1.0, max_new_tokens=16,
                           batch_size=2)
    for p, o in zip(prompts, outs):
        ref = model.generate(torch.tensor([p]), do_sample=False, max_new_tokens=16,
                             eos_token_id=eos, pad_token_id=tok.pad_token_id)[0, len(p):]
        ref = ref.tolist()
        if any(t in eos for t in ref):
            ref = ref[: next(i for i, t in enumerate(ref) if t in eos) + 1]
        assert o.ids == ref
