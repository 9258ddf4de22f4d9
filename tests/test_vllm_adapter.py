"""The vLLM backend's pure conversions, tested without vLLM; its clear errors without it."""

from __future__ import annotations

import dataclasses
import importlib.util
import math

import pytest

from renio_core.backends.vllm import (
    adapter_rank,
    check_scoring_temperature,
    check_tensor_parallel,
    completion_from_vllm,
    engine_lora_rank,
    engine_parallel_args,
    logprobs_from_prompt_logprobs,
    lora_engine_args,
    require_vllm,
)
from renio_core.errors import RenioInputError


@dataclasses.dataclass
class Lp:
    """The fields of vLLM's ``Logprob`` that renio reads."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


EOS = [7, 9]


def test_completion_kept_when_eos_already_in_ids():
    assert completion_from_vllm([1, 2, 7], "stop", None, EOS) == ([1, 2, 7], "stop")


def test_completion_gets_eos_appended_when_vllm_dropped_it():
    assert completion_from_vllm([1, 2], "stop", None, EOS) == ([1, 2, 7], "stop")
    # A secondary EOS passed as a stop token id: vLLM reports which one.
    assert completion_from_vllm([1, 2], "stop", 9, EOS) == ([1, 2, 9], "stop")


def test_completion_length_and_abort_are_length():
    assert completion_from_vllm((3, 4, 5), "length", None, EOS) == ([3, 4, 5], "length")
    assert completion_from_vllm([3], "abort", None, EOS) == ([3], "length")
    assert completion_from_vllm([], "length", None, EOS) == ([], "length")


def test_completion_stop_string_is_a_bug():
    with pytest.raises(ValueError, match="stop string"):
        completion_from_vllm([1], "stop", "###", EOS)


def _prompt_logprobs():
    # Sequence [10, 11, 12, 13]: position 0 has no log-prob; the actual token at position 2
    # is outside the top-2 and comes with its own rank.
    return [
        None,
        {11: Lp(-0.1, 1), 5: Lp(-2.5, 2)},
        {4: Lp(-0.3, 1), 6: Lp(-1.5, 2), 12: Lp(-4.0, 7)},
        {13: Lp(-0.7, 2), 8: Lp(-0.6, 1)},
    ]


def test_prompt_logprobs_of_the_completion_span():
    lps, ids, tlp = logprobs_from_prompt_logprobs(_prompt_logprobs(), [10, 11, 12, 13], 2, 4)
    assert lps == [-4.0, -0.7] and ids is None and tlp is None


def test_prompt_logprobs_topk_sorted_and_excluding_the_out_of_rank_token():
    lps, ids, tlp = logprobs_from_prompt_logprobs(_prompt_logprobs(), [10, 11, 12, 13], 1, 4,
                                                  topk=2)
    assert lps == [-0.1, -4.0, -0.7]
    assert ids == [[11, 5], [4, 6], [8, 13]]
    assert tlp == [[-0.1, -2.5], [-0.3, -1.5], [-0.6, -0.7]]


def test_prompt_logprobs_accept_plain_floats_and_empty_span():
    plain = [None, {3: math.log(0.5)}]
    assert logprobs_from_prompt_logprobs(plain, [1, 3], 1, 2)[0] == [math.log(0.5)]
    assert logprobs_from_prompt_logprobs(plain, [1, 3], 2, 2)[0] == []


def test_prompt_logprobs_errors():
    with pytest.raises(ValueError, match="no log-prob for the token"):
        logprobs_from_prompt_logprobs([None, {4: Lp(-1.0, 1)}], [1, 3], 1, 2)
    with pytest.raises(ValueError, match="prompt log-probs for"):
        logprobs_from_prompt_logprobs([None], [1, 3], 1, 2)
    with pytest.raises(ValueError, match="top log-probs"):
        logprobs_from_prompt_logprobs([None, {3: Lp(-1.0, 1)}], [1, 3], 1, 2, topk=2)


def test_temperature_check():
    check_scoring_temperature(1.0)
    with pytest.raises(RenioInputError, match="cannot score exactly at temperature 1.1"):
        check_scoring_temperature(1.1)


def test_require_vllm_is_a_clear_error_here():
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed here (tests/test_vllm_backend.py runs it)")
    with pytest.raises(RenioInputError, match="--backend vllm needs"):
        require_vllm()


def test_engine_lora_rank_rounds_up_to_a_rank_vllm_accepts():
    # vLLM's LoRAConfig.max_lora_rank takes 1, 8, 16, 32, 64, 128, 256, 320 or 512.
    assert [engine_lora_rank(r) for r in (1, 2, 8, 9, 16, 64, 65, 300, 512)] == \
        [1, 8, 8, 16, 16, 64, 128, 320, 512]
    with pytest.raises(RenioInputError, match="LoRA rank 513 is above"):
        engine_lora_rank(513)


def test_lora_engine_args():
    assert lora_engine_args(None) == {}
    assert lora_engine_args(48) == {"enable_lora": True, "max_lora_rank": 64, "max_loras": 1}


def test_adapter_rank_reads_peft_config_and_names_the_file(tmp_path):
    (tmp_path / "adapter_config.json").write_text('{"r": 24, "lora_alpha": 48}')
    assert adapter_rank(tmp_path) == 24
    (tmp_path / "adapter_config.json").write_text('{"r": 0}')
    with pytest.raises(RenioInputError, match="'r' must be a positive integer"):
        adapter_rank(tmp_path)
    full = tmp_path / "full-model"
    full.mkdir()
    with pytest.raises(RenioInputError, match="not a LoRA adapter") as err:
        adapter_rank(full)
    assert "adapter_config.json" in str(err.value)


def test_engine_parallel_args_pass_the_size_to_vllm():
    assert engine_parallel_args(1, 0, True) == {"tensor_parallel_size": 1}  # a CPU build
    assert engine_parallel_args(1, 1, False) == {"tensor_parallel_size": 1}
    assert engine_parallel_args(4, 4, False) == {"tensor_parallel_size": 4}
    assert engine_parallel_args(2, 8, False) == {"tensor_parallel_size": 2}


def test_engine_parallel_args_refuse_more_gpus_than_visible_and_a_cpu_build():
    with pytest.raises(RenioInputError, match=r"--tensor-parallel-size 4: only 2 CUDA GPUs "
                                              r"visible"):
        engine_parallel_args(4, 2, False)
    with pytest.raises(RenioInputError, match=r"--tensor-parallel-size 2: only 1 CUDA GPU "
                                              r"visible"):
        engine_parallel_args(2, 1, False)
    with pytest.raises(RenioInputError, match="only 0 CUDA GPUs"):
        engine_parallel_args(1, 0, False)  # a CUDA build with no GPU visible
    with pytest.raises(RenioInputError, match="--tensor-parallel-size 2: this vLLM is a CPU "
                                              "build"):
        engine_parallel_args(2, 8, True)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(RenioInputError, match="--tensor-parallel-size: must be an integer"):
            engine_parallel_args(bad, 8, False)


def test_tensor_parallel_above_one_needs_the_vllm_backend():
    check_tensor_parallel(1, "hf")
    check_tensor_parallel(2, "vllm")
    with pytest.raises(RenioInputError, match="--tensor-parallel-size 2: needs --backend vllm"):
        check_tensor_parallel(2, "hf")
