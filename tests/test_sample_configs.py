"""The official recipes in sample_configs/ carry every value their script sets.

Expected values are read by hand from BDML-lab/ReNIO's scripts (scripts/run_opd_1b.sh,
scripts/run_opsd_1b.sh, run_opsd_4b.sh, run_opsd_8b.sh) and its opsd_train.py, not from the
configs: learning rate 5e-6, 126 steps, per-device batch and accumulation on 4 GPUs, max
completion 1024, beta 0, token clip (--jsd_token_clip), LoRA r 64 / alpha 128 on the seven
projections, T 1.1 / top-p 0.95 / top-k 20, --kd_clamp and --imp_token_threshold,
--max_grad_norm (the Trainer's default 1.0 where the script sets none).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from renio_core.run.config import load_run_config

CONFIGS = Path(__file__).resolve().parents[1] / "sample_configs"
SEVEN = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# script: (config, teacher, batch/device, grad accum, kd_clamp, threshold, token clip, grad clip)
OFFICIAL = {
    "run_opd_1b.sh": ("official-opd-qwen3-1.7b", "separate", 8, 1, 2.0, 1.0, 0.05, 1.0),
    "run_opsd_1b.sh": ("official-opsd-qwen3-1.7b", "self", 8, 1, 2.5, 0.8, 0.05, 1.0),
    "run_opsd_4b.sh": ("official-opsd-qwen3-4b", "self", 4, 2, 2.0, 0.01, 0.05, 0.1),
    "run_opsd_8b.sh": ("official-opsd-qwen3-8b", "self", 2, 4, 2.0, 0.01, 0.06, 0.1),
}


@pytest.mark.parametrize("script", sorted(OFFICIAL))
def test_official_recipe(script, tmp_path):
    name, teacher, per_device, accum, clip, threshold, token_clip, grad_clip = OFFICIAL[script]
    path = CONFIGS / f"{name}.yaml"
    assert path.read_text().splitlines()[0] == f"# renio run --config sample_configs/{name}.yaml prompts=PATH_OR_DATASET"
    cfg = load_run_config(path, [f"run_dir={tmp_path}"])
    assert cfg.iterations == 126
    assert cfg.prompts_per_iteration == per_device * accum * 4
    assert (cfg.teacher == "self") == (teacher == "self")
    c = cfg.stage_configs(tmp_path / "iter-00000", adapter=None, policy_step=0)
    r, s, w, t = c["rollout"], c["score"], c["weight"], c["train"]
    assert (r.n, r.temperature, r.top_p, r.top_k, r.max_new_tokens) == (1, 1.1, 0.95, 20, 1024)
    assert s.privileged  # the collator's teacher prompt, OPD included
    assert (w.scheme, w.clip, w.threshold, w.tem, w.norm) == ("renio", clip, threshold, 1.0, "batch_mean")
    assert w.group_size == per_device  # normalized over one device's micro-batch
    assert (t.loss, t.beta, t.token_clip, t.lr, t.grad_clip) == ("jsd", 0.0, token_clip, 5e-6, grad_clip)
    assert (t.lora, t.lora_r, t.lora_alpha, tuple(t.lora_targets)) == (True, 64, 128, SEVEN)
    assert (t.lr_schedule, t.warmup_steps, t.steps_per_batch) == ("linear", 0, 1)
    assert t.schedule_steps == 126 and t.gradient_checkpointing
    # One step per fresh batch: the batch's micro-batches are the 4 devices x accumulation.
    assert cfg.prompts_per_iteration // w.group_size == 4 * accum
    # opsd_trainer.py computes the ReNIO weight from its training step's own forward, where it
    # also gets the sampled tokens' log-probs: no separate scoring pass.
    assert t.weights_from == "live"
    assert cfg.scoring() == (True, "scoring: in the train step (live weights, one step per "
                                   "batch, jsd)")


def test_r1_distill_recipe_scores_in_the_train_step(tmp_path):
    cfg = load_run_config(CONFIGS / "r1-distill-qwen-7b-opd-renio.yaml", [f"run_dir={tmp_path}"])
    assert cfg.scoring()[0]
