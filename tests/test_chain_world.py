"""The chain toy world: task, recovering traces, deterministic quick build, loading, and the
measurement of the numbers the world promises (mechanics only; the full build's numbers are in
docs/toy-worlds.md)."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from renio_core.data.prompts import render_ids, student_messages
from renio_core.errors import RenioInputError
from renio_core.formulas.eval_metrics import count_markers
from renio_core.grading.grader import grade_math
from renio_core.modeling.toy import chain
from renio_core.modeling.toy.tokenizer import build_tokenizer


def test_solution_by_hand() -> None:
    p = chain.ChainProblem(7, (("+", 5), ("*", 3), ("+", 9)))
    # 7+5 = 12 -> 2; 2*3 = 6; 6+9 = 15 -> 5.
    assert p.problem == "7+5*3+9" and p.k == 3 and p.answer == "5"
    assert chain.solution(p) == "7+5=2\n2*3=6\n6+9=5\n\\boxed{5}"
    assert grade_math(chain.solution(p), p.answer)
    assert not grade_math(chain.solution(p).replace("{5}", "{4}"), p.answer)


def test_split_is_deterministic_disjoint_and_spans_k() -> None:
    train, test = chain.split_chains(0, 300, 100)
    assert chain.split_chains(0, 300, 100) == (train, test)
    assert not set(train) & set(test)
    assert {p.k for p in test} == set(range(chain.K_MIN, chain.K_MAX + 1))
    assert all(d in chain.TIMES_DIGITS for p in train for o, d in p.ops if o == "*")


def test_recovering_traces_train_no_wrong_line() -> None:
    tok = build_tokenizer()
    spec = chain.ChainTrainSpec(steps=1, batch_size=6, lr=1e-3, warmup=1, inject=1.0)
    ids_BL, mask_BL, labels_BL = next(chain._chain_batches(tok, spec, 1, 0, "t", frozenset()))
    for ids, mask, labels in zip(ids_BL.tolist(), mask_BL.tolist(), labels_BL.tolist()):
        n = sum(mask)
        text = tok.decode(ids[:n])
        start = text.index("</think>\n\n") + len("</think>\n\n")  # end of the prompt
        prompt_len = len(tok(text[:start], add_special_tokens=False)["input_ids"])
        assert all(lab == -100 for lab in labels[:prompt_len])
        trained = tok.decode([t for t, lab in zip(ids[prompt_len:n], labels[prompt_len:n])
                              if lab != -100], skip_special_tokens=True)
        untrained = tok.decode([t for t, lab in zip(ids[prompt_len:n], labels[prompt_len:n])
                                if lab == -100])
        # Every step was injected (inject 1.0): the trained text is `wait` + the right line per
        # step, then the answer; the untrained text is exactly the wrong lines.
        right = [ln for ln in trained.split("\n") if ln and ln != chain.MARKER]
        wrong = [ln for ln in untrained.split("\n") if ln]
        assert trained.count(chain.MARKER) == len(wrong) == len(right) - 1 >= chain.K_MIN
        for w, r in zip(wrong, right):
            head_w, val_w = w.split("=")
            head_r, val_r = r.split("=")
            assert head_w == head_r and val_w != val_r
        assert count_markers(tok.decode(ids[prompt_len:n]))["wait"] == len(wrong)


def test_target_failures_by_hand() -> None:
    good = {"teacher_sampled": 0.9, "student_sampled": 0.4, "marker_after_wrong": 0.7,
            "marker_after_right": 0.01,
            "student_by_k": {"3": 0.7, "4": 0.6, "5": 0.45, "6": 0.3, "7": 0.25, "8": 0.15}}
    assert chain.target_failures(good) == []
    assert len(chain.target_failures({**good, "teacher_sampled": 0.84})) == 1
    assert len(chain.target_failures({**good, "student_sampled": 0.61})) == 1
    assert len(chain.target_failures({**good, "marker_after_wrong": 0.49})) == 1
    assert len(chain.target_failures({**good, "marker_after_right": 0.051})) == 1
    flat = {**good, "student_by_k": {"3": 0.4, "8": 0.4}}
    assert "does not fall with K" in chain.target_failures(flat)[0]


@pytest.fixture(scope="module")
def quick_chain(tmp_path_factory: pytest.TempPathFactory):
    return chain.build_chain_world(tmp_path_factory.mktemp("chain") / "w", seed=0, quick=True)


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def test_quick_build_is_deterministic_and_loads(quick_chain, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    again = chain.build_chain_world(tmp_path / "again", seed=0, quick=True)
    first, second = _tree_bytes(quick_chain.root), _tree_bytes(again.root)
    assert sorted(first) == sorted(second)
    assert [k for k in first if first[k] != second[k]] == []
    assert quick_chain.manifest["world"] == "chain"
    teacher = AutoModelForCausalLM.from_pretrained(str(quick_chain.teacher))
    student = AutoModelForCausalLM.from_pretrained(str(quick_chain.student))
    assert sum(p.numel() for p in student.parameters()) < sum(p.numel() for p in teacher.parameters())
    tok = AutoTokenizer.from_pretrained(str(quick_chain.tokenizer))
    assert len(tok) == teacher.config.vocab_size


def test_marker_probability_matches_stepwise_forward(quick_chain) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(quick_chain.tokenizer))
    model = AutoModelForCausalLM.from_pretrained(str(quick_chain.teacher)).eval()
    p = chain.ChainProblem(7, (("+", 5), ("*", 3), ("+", 9)))
    prompt = render_ids(tok, student_messages(p.problem, chain.TASK))
    prefixes = [prompt + tok("7+5=3\n", add_special_tokens=False)["input_ids"], prompt]
    got = chain.marker_probability(model, tok, prefixes)
    # Independently: one unpadded forward per marker character, multiplying probabilities.
    for prefix, value in zip(prefixes, got):
        ids, prob = list(prefix), 1.0
        for ch in chain.MARKER:
            with torch.no_grad():
                probs = torch.softmax(model(input_ids=torch.tensor([ids])).logits[0, -1], -1)
            t = tok(ch, add_special_tokens=False)["input_ids"][0]
            prob *= float(probs[t])
            ids.append(t)
        assert value == pytest.approx(prob, rel=1e-4)


def test_measure_chain_mechanics(quick_chain) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(quick_chain.tokenizer))
    teacher = AutoModelForCausalLM.from_pretrained(str(quick_chain.teacher)).eval()
    student = AutoModelForCausalLM.from_pretrained(str(quick_chain.student)).eval()
    problems = chain.split_chains(0, 0, 24)[1]
    m = chain.measure_chain(teacher, student, tok, problems, seed=0)
    assert set(m) >= {"teacher_sampled", "student_sampled", "student_by_k",
                      "marker_after_wrong", "marker_after_right"}
    assert set(m["student_by_k"]) == {str(p.k) for p in problems}
    for key in ("teacher_sampled", "student_sampled", "marker_after_wrong", "marker_after_right"):
        assert 0.0 <= m[key] <= 1.0 and not math.isnan(m[key])
    assert isinstance(chain.target_failures(m), list)
    # Deterministic: the same seed gives the same numbers.
    assert chain.measure_chain(teacher, student, tok, problems, seed=0) == m


def test_cli_quick_build_and_unknown_names(tmp_path: Path) -> None:
    out = tmp_path / "w"
    cmd = [sys.executable, "-m", "renio_cli.main", "toy", "build", "--world", "chain",
           "--out", str(out), "--quick"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "chain toy world" in proc.stdout and (out / "teacher" / "model.safetensors").is_file()
    bad = subprocess.run([sys.executable, "-m", "renio_cli.main", "toy", "build", "--world",
                          "nope", "--out", str(tmp_path / "x"), "--quick"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "--world" in bad.stderr
    with pytest.raises(RenioInputError, match="toy-chain:teacher"):
        chain.resolve_chain_model("toy-chain:nope")


def test_run_resolves_chain_prompt_names(quick_chain, monkeypatch) -> None:
    from renio_core.data.prompt_io import load_prompts
    from renio_core.run import config as run_config

    calls = []

    def fake_ensure(*args, **kwargs):  # the quick world stands in for the cached full one
        calls.append(args)
        return quick_chain

    monkeypatch.setattr(chain, "ensure_chain_world", fake_ensure)
    train = run_config.resolve_prompts("toy-chain:train", "prompts")
    test = run_config.resolve_prompts("toy-chain:test", "eval_prompts")
    assert (train, test) == (str(quick_chain.train_prompts), str(quick_chain.test_prompts))
    assert len(load_prompts(train).prompts) == chain.N_TRAIN
    assert len(load_prompts(test).prompts) == chain.N_TEST
    with pytest.raises(RenioInputError, match="toy-chain:train or toy-chain:test"):
        run_config.resolve_prompts("toy-chain:nope", "prompts")
    assert len(calls) == 2  # an unknown name fails before building anything
