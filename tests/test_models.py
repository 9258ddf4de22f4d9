"""renio_core.modeling.models: loading, fingerprints, tokenizer compatibility, chunked log-probs."""

from __future__ import annotations

import pytest
import torch
from tiny_models import make_model

from renio_core.errors import RenioInputError
from renio_core.modeling import models as M


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {
        "a": make_model(root / "a", seed=0),
        "b": make_model(root / "b", seed=1),
        "padded": make_model(root / "padded", seed=2, vocab_pad=37),
        "reversed": make_model(root / "reversed", seed=3, reverse_tokenizer=True),
    }


def _direct(model, ids, start, end, T):
    """Independent reference: one full forward pass of one unpadded row."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    lp = torch.log_softmax(logits / T, dim=-1)
    return torch.stack([lp[p - 1, ids[p]] for p in range(start, end)]), lp


@pytest.mark.parametrize("T,chunk,topk", [(1.0, 1, 0), (1.1, 3, 4), (0.7, 1000, 2)])
def test_sequence_logprobs_match_direct_forward(tiny, T, chunk, topk):
    model = M.load_model(tiny["a"], dtype="float32", device="cpu")
    rows = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [20, 21, 22, 23, 24]]
    spans = [(3, 7), (1, 3), (4, 5)]
    ids_BL, attn_BL = M.pad_right(rows, 0)
    res = M.sequence_logprobs(model, ids_BL, attn_BL, spans, temperature=T, chunk=chunk,
                              topk=topk)
    for b, (ids, (s, e)) in enumerate(zip(rows, spans)):
        want, full = _direct(model, ids, s, e, T)
        assert res.logprobs[b].shape == (e - s,)
        assert torch.allclose(res.logprobs[b], want, atol=1e-5)
        if topk:
            ref_vals, ref_ids = full[s - 1 : e - 1].topk(topk, dim=-1)
            assert torch.equal(res.topk_ids[b], ref_ids)
            assert torch.allclose(res.topk_logprobs[b], ref_vals, atol=1e-5)
        else:
            assert res.topk_ids is None


def test_sequence_logprobs_edge_single_token_span(tiny):
    model = M.load_model(tiny["a"], dtype="float32", device="cpu")
    ids_BL, attn_BL = M.pad_right([[5, 6]], 0)
    res = M.sequence_logprobs(model, ids_BL, attn_BL, [(1, 2)])
    want, _ = _direct(model, [5, 6], 1, 2, 1.0)
    assert torch.allclose(res.logprobs[0], want, atol=1e-6)
    # Identity: log-probs are <= 0 and the top-1 at temperature -> the argmax.
    assert (res.logprobs[0] <= 0).all()


def test_fingerprints(tiny):
    ta, tb, tr = (M.load_tokenizer(tiny[k]) for k in ("a", "b", "reversed"))
    assert M.tokenizer_fingerprint(ta) == M.tokenizer_fingerprint(tb)
    assert M.tokenizer_fingerprint(ta) != M.tokenizer_fingerprint(tr)
    assert M.model_fingerprint(tiny["a"]) == M.model_fingerprint(tiny["a"])
    assert M.model_fingerprint(tiny["a"]) != M.model_fingerprint(tiny["b"])


def test_tokenizer_fingerprint_follows_changes_to_the_same_object(tiny):
    """The fingerprint is kept on the tokenizer object; added tokens or a new pad token make
    it what a fresh computation gives."""
    tok = M.load_tokenizer(tiny["a"])
    before = M.tokenizer_fingerprint(tok)
    assert M.tokenizer_fingerprint(tok) == before
    tok.add_tokens(["<renio-new-token>"])
    grown = M.tokenizer_fingerprint(tok)
    assert grown != before
    tok.pad_token = tok.convert_ids_to_tokens(len(tok) - 1)
    fresh = M.load_tokenizer(tiny["a"])
    fresh.add_tokens(["<renio-new-token>"])
    fresh.pad_token = fresh.convert_ids_to_tokens(len(fresh) - 1)
    assert M.tokenizer_fingerprint(tok) == M.tokenizer_fingerprint(fresh) != grown


def test_tokenizer_compatibility(tiny):
    ta = M.load_tokenizer(tiny["a"])
    M.check_tokenizers_compatible(ta, M.load_tokenizer(tiny["b"]))
    # A teacher whose embedding is padded larger shares the tokenizer: fine.
    M.check_tokenizers_compatible(ta, M.load_tokenizer(tiny["padded"]))
    with pytest.raises(RenioInputError, match="tokenizer mismatch") as err:
        M.check_tokenizers_compatible(ta, M.load_tokenizer(tiny["reversed"]),
                                      teacher_name="rev")
    assert "\n" not in str(err.value) and "rev" in str(err.value)


def test_load_errors(tmp_path, tiny):
    with pytest.raises(RenioInputError, match="no such model folder"):
        M.load_model(tmp_path / "nope")
    with pytest.raises(RenioInputError, match="adapter not found"):
        M.load_model(tiny["a"], adapter=tmp_path / "no-adapter")
    with pytest.raises(RenioInputError, match="--dtype"):
        M.choose_dtype("float8", torch.device("cpu"))
    assert M.choose_dtype("auto", torch.device("cpu")) == torch.float32


def test_adapter_can_be_disabled(tiny, tmp_path):
    from peft import LoraConfig, get_peft_model

    base = M.load_model(tiny["a"], dtype="float32", device="cpu")
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                 init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    loaded = M.load_model(tiny["a"], adapter=tmp_path / "adapter", dtype="float32",
                          device="cpu")
    assert M.has_adapter(loaded)
    plain = M.load_model(tiny["a"], dtype="float32", device="cpu")
    ids_BL, attn_BL = M.pad_right([[5, 6, 7, 8]], 0)
    with_adapter = M.sequence_logprobs(loaded, ids_BL, attn_BL, [(1, 4)]).logprobs[0]
    with loaded.disable_adapter():
        without = M.sequence_logprobs(loaded, ids_BL, attn_BL, [(1, 4)]).logprobs[0]
    base_lp = M.sequence_logprobs(plain, ids_BL, attn_BL, [(1, 4)]).logprobs[0]
    assert torch.allclose(without, base_lp, atol=1e-6)
    assert not torch.allclose(with_adapter, base_lp, atol=1e-4)


def test_config_vocab_size_is_the_heads_rows(tiny):
    # What the vLLM scorer checks token ids against (from the config, without loading the
    # model) must be what the HF scorer reads from the loaded head, a padded vocabulary too.
    for name in ("a", "padded"):
        model = M.load_model(str(tiny[name]), dtype="float32", device="cpu")
        assert M.config_vocab_size(str(tiny[name])) == M.vocab_rows(model)
    assert M.vocab_rows(M.load_model(str(tiny["padded"]), dtype="float32", device="cpu")) \
        == M.vocab_rows(M.load_model(str(tiny["a"]), dtype="float32", device="cpu")) + 37


# --------------------------------------------------------------------------------------------
# --device-map: every refusal is a pure function of what the machine has
# --------------------------------------------------------------------------------------------


def test_device_map_problem_accepts_none_anywhere_and_auto_on_gpus():
    assert M.device_map_problem("none", "cpu", "vllm", 0, False) is None
    assert M.device_map_problem("auto", "auto", "hf", 1, True) is None
    assert M.device_map_problem("auto", "cuda", "hf", 4, True) is None


def test_device_map_problem_refusals():
    def problem(device_map="auto", device="auto", backend="hf", cuda=2, accelerate=True):
        return M.device_map_problem(device_map, device, backend, cuda, accelerate)

    assert problem(device_map="balanced") == "must be one of none, auto, got 'balanced'"
    assert problem(cuda=0) == "auto needs CUDA GPUs; on a CPU leave it unset"
    assert "pip install accelerate" in problem(accelerate=False)
    assert "--tensor-parallel-size" in problem(backend="vllm")
    assert "leave --device at auto" in problem(device="cuda:1")
    assert "leave --device at auto" in problem(device="cpu", cuda=0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU refusal; a GPU machine spreads")
def test_load_model_refuses_device_map_auto_without_cuda(toy_world):
    with pytest.raises(RenioInputError, match="--device-map: auto needs CUDA GPUs; on a CPU "
                                              "leave it unset"):
        M.load_model(toy_world.student, dtype="float32", device_map="auto")
