"""The toy world: task, tokenizer, deterministic build, offline loading, accuracy, signal."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from renio_core.data.prompts import privileged_messages, render_ids, student_messages
from renio_core.modeling.toy import (
    ToyWorld,
    build_toy_world,
    ensure_toy_world,
    grade,
    resolve_model,
)
from renio_core.modeling.toy import task as toy_task

# ----------------------------------------------------------------------------- task


def test_solution_steps_hand_computed() -> None:
    # 347 + 285: 7+5=12 (write 2, carry 1), 4+8+1=13 (write 3, carry 1), 3+2+1=6 -> 632.
    p = toy_task.Problem(347, 285)
    assert toy_task.solution(p) == "7+5+0=12\n4+8+1=13\n3+2+1=6\n\\boxed{632}"
    assert p.answer == "632"
    assert toy_task.carry_columns(p) == [1, 2]


def test_dropped_carry_changes_the_answer() -> None:
    p = toy_task.Problem(347, 285)
    # Forget the carry into the tens: 4+8+0=12, then 3+2+1=6 -> 622.
    assert toy_task.solution(p, drop_carries=frozenset({1})) == (
        "7+5+0=12\n4+8+0=12\n3+2+1=6\n\\boxed{622}")
    # A final carry that is forgotten loses the leading 1: 999+1xx.
    q = toy_task.Problem(999, 101)
    assert toy_task.solution(q).endswith("\\boxed{1100}")
    assert toy_task.solution(q, drop_carries=frozenset({3})).endswith("\\boxed{100}")


def test_grade() -> None:
    assert grade("7+5+0=12\n\\boxed{632}", "632")
    assert grade("\\boxed{1} then \\boxed{ 632 }", "632")  # the last box counts
    assert not grade("\\boxed{632} then \\boxed{622}", "632")
    assert not grade("632", "632")  # no box, no credit
    assert not grade("\\boxed{632", "632")  # unclosed
    assert grade("\\boxed{0632}", "632")


def test_splits_are_disjoint_and_seeded() -> None:
    train, test = toy_task.split_problems(0, 100, 50)
    assert len(set(train)) == 100 and len(set(test)) == 50 and not set(train) & set(test)
    assert toy_task.split_problems(0, 100, 50) == (train, test)
    assert toy_task.split_problems(1, 100, 50)[0] != train


# ----------------------------------------------------------------------------- build


@pytest.fixture(scope="module")
def quick_world(tmp_path_factory: pytest.TempPathFactory) -> ToyWorld:
    return build_toy_world(tmp_path_factory.mktemp("quick") / "world", seed=0, quick=True)


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def test_same_seed_gives_identical_files(quick_world: ToyWorld, tmp_path: Path) -> None:
    again = build_toy_world(tmp_path / "again", seed=0, quick=True)
    first, second = _tree_bytes(quick_world.root), _tree_bytes(again.root)
    assert sorted(first) == sorted(second)
    assert [k for k in first if first[k] != second[k]] == []
    other = _tree_bytes(build_toy_world(tmp_path / "seed1", seed=1, quick=True).root)
    assert other["teacher/model.safetensors"] != first["teacher/model.safetensors"]
    assert other["test.jsonl"] != first["test.jsonl"]


def test_layout_and_prompt_files(quick_world: ToyWorld) -> None:
    w = quick_world
    for d in (w.teacher, w.student):
        for name in ("config.json", "model.safetensors", "generation_config.json",
                     "tokenizer.json", "tokenizer_config.json"):
            assert (d / name).is_file(), d / name
    assert (w.tokenizer / "tokenizer.json").is_file()
    rows = [json.loads(line) for line in w.test_prompts.read_text().splitlines()]
    assert len(rows) == 256
    for row in rows:
        assert set(row) == {"id", "problem", "solution", "answer", "task"}
        assert row["task"] == "math"
        assert grade(row["solution"], row["answer"])
        a, b = map(int, row["problem"].split("+"))
        assert int(row["answer"]) == a + b
    train_ids = {json.loads(line)["id"] for line in w.train_prompts.read_text().splitlines()}
    assert len(train_ids) == 1024 and not train_ids & {r["id"] for r in rows}
    text = "\n".join(p.read_text() for p in w.root.rglob("*.json*"))
    assert str(w.root) not in text  # no absolute paths in the files


def test_loads_offline_with_from_pretrained(quick_world: ToyWorld) -> None:
    code = r"""
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from renio_core.data.prompts import student_messages
root = sys.argv[1]
for name in ("tokenizer", "teacher", "student"):
    tok = AutoTokenizer.from_pretrained(f"{root}/{name}")
    msgs = student_messages("347+285")
    off = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True,
                                  enable_thinking=False)
    on = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True,
                                 enable_thinking=True)
    plain = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert off == on + "<think>\n\n</think>\n\n" and plain == on, (off, on)
    assert on.startswith("<|im_start|>user\n347+285\n\n") and on.endswith("<|im_start|>assistant\n")
    ids = tok(off, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == off
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    if name != "tokenizer":
        model = AutoModelForCausalLM.from_pretrained(f"{root}/{name}")
        assert type(model).__name__ == "Qwen3ForCausalLM"
        out = model(torch.tensor([ids])).logits
        assert out.shape == (1, len(ids), len(tok))
print("ok")
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", code, str(quick_world.root)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("ok")


def test_tokenizer_round_trip(quick_world: ToyWorld) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(quick_world.tokenizer))
    text = "Some text:  {x}\n\t7+5+0=12 \\boxed{12}"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    for special in ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "<think>", "</think>"):
        assert len(tok(special, add_special_tokens=False)["input_ids"]) == 1
    # The privileged prompt carries the reference solution verbatim.
    priv = render_ids(tok, privileged_messages("347+285", "7+5+0=12", "math"))
    assert "7+5+0=12" in tok.decode(priv)


def test_cli_quick_build(tmp_path: Path) -> None:
    out = tmp_path / "w"
    cmd = [sys.executable, "-m", "renio_cli.main", "toy", "build", "--out", str(out), "--quick"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (out / "student" / "model.safetensors").is_file()
    assert "toy world" in proc.stdout
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "--overwrite" in again.stderr


def test_resolve_model_passes_real_names_through() -> None:
    for name in ("Qwen/Qwen3-1.7B", "/some/local/path", "toy:unknown"):
        assert resolve_model(name) == name


# ----------------------------------------------------------------------------- trained world


def test_cache_is_reused(toy_world: ToyWorld) -> None:
    assert ensure_toy_world().root == toy_world.root
    assert resolve_model("toy:student") == str(toy_world.student)
    assert resolve_model("toy:teacher") == str(toy_world.teacher)
    assert resolve_model("toy:tokenizer") == str(toy_world.tokenizer)
    assert not any(p.name.startswith(f".{toy_world.root.name}.tmp")
                   for p in toy_world.root.parent.iterdir())


SAMPLING = {"do_sample": True, "temperature": 1.1, "top_p": 0.95, "top_k": 20}


def _load(world: ToyWorld):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(world.tokenizer))
    teacher = AutoModelForCausalLM.from_pretrained(str(world.teacher)).eval()
    student = AutoModelForCausalLM.from_pretrained(str(world.student)).eval()
    rows = [json.loads(line) for line in world.test_prompts.read_text().splitlines()]
    return tok, teacher, student, rows


def _sample(model, tok, prompts: list[list[int]], seed: int, **kwargs) -> list[list[int]]:
    """Completion ids (EOS kept when sampled), one batch with left padding."""
    import torch

    torch.manual_seed(seed)
    length = max(map(len, prompts))
    ids = torch.full((len(prompts), length), tok.pad_token_id)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, length - len(p):] = torch.tensor(p)
        mask[i, length - len(p):] = 1
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=48,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                             **kwargs)
    completions = []
    for row in out[:, length:].tolist():
        if tok.eos_token_id in row:
            row = row[:row.index(tok.eos_token_id) + 1]
        completions.append(row)
    return completions


def _accuracy(model, tok, rows, prompts, seed, **kwargs) -> float:
    completions = _sample(model, tok, prompts, seed, **kwargs)
    texts = [tok.decode(c, skip_special_tokens=True) for c in completions]
    return sum(grade(t, r["answer"]) for t, r in zip(texts, rows)) / len(rows)


@pytest.mark.integration
def test_accuracy_targets(toy_world: ToyWorld) -> None:
    tok, teacher, student, rows = _load(toy_world)
    plain = [render_ids(tok, student_messages(r["problem"], "math")) for r in rows]
    priv = [render_ids(tok, privileged_messages(r["problem"], r["solution"], "math"))
            for r in rows]
    acc = {
        "teacher_greedy": _accuracy(teacher, tok, rows, plain, 11, do_sample=False),
        "teacher_sampled": _accuracy(teacher, tok, rows, plain, 12, **SAMPLING),
        "student_sampled": _accuracy(student, tok, rows, plain, 13, **SAMPLING),
        "student_privileged": _accuracy(student, tok, rows, priv, 14, **SAMPLING),
    }
    print(acc)
    assert acc["teacher_greedy"] >= 0.95
    assert acc["teacher_sampled"] >= 0.85
    assert 0.20 <= acc["student_sampled"] <= 0.60
    assert acc["student_privileged"] >= 0.80


def _completion_logprobs(model, prompt: list[int], completion: list[int],
                         temperature: float) -> list[float]:
    """log softmax(logits / T) at each completion token, given prompt and prefix."""
    import torch

    ids_1L = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits_LV = model(ids_1L).logits[0].float() / temperature
    logp_LV = torch.log_softmax(logits_LV, dim=-1)
    # The token at position i is predicted by the logits at position i - 1.
    pos = torch.arange(len(prompt) - 1, len(prompt) + len(completion) - 1)
    return logp_LV[pos, torch.tensor(completion)].tolist()


@pytest.mark.integration
def test_renio_signal_marks_wrong_samples(toy_world: ToyWorld) -> None:
    tok, teacher, student, rows = _load(toy_world)
    plain = [render_ids(tok, student_messages(r["problem"], "math")) for r in rows]
    completions = _sample(student, tok, plain, 21, **SAMPLING)
    hits = {True: [], False: []}
    for r, prompt, completion in zip(rows, plain, completions):
        s = _completion_logprobs(student, prompt, completion, 1.1)
        q = _completion_logprobs(teacher, prompt, completion, 1.1)
        reaches = max(a - b for a, b in zip(s, q)) >= 0.8
        hits[grade(tok.decode(completion, skip_special_tokens=True), r["answer"])].append(reaches)
    rate_wrong = sum(hits[False]) / len(hits[False])
    rate_right = sum(hits[True]) / len(hits[True])
    print(f"pivotal-token rate: wrong {rate_wrong:.3f} (n={len(hits[False])}), "
          f"right {rate_right:.3f} (n={len(hits[True])})")
    assert len(hits[False]) >= 20 and len(hits[True]) >= 20
    assert rate_wrong >= 0.8
    assert rate_wrong >= 3 * rate_right
