"""Checkpoints of the train stage: the model or adapter in Hugging Face format plus the
trainer state (AdamW, schedule, RNG, the data it was trained on), put in place by a rename.

A checkpoint is written to a temporary sibling folder and swapped in (:func:`swap_dir`), so a
killed run leaves the previous checkpoint or the new one, never half of one. ``--resume``
continues the same run from it; ``--init-from`` continues another run's optimizer and
schedule (:func:`schedule_position`), which is how ``renio run`` steps one optimizer across
iterations.
"""

from __future__ import annotations

import copy
import json
import os
import pickle
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from renio_core.data import shards
from renio_core.errors import RenioInputError
from renio_core.modeling import models
from renio_core.training.module import DistillModule
from renio_core.training.parallel import Dist

STATE_FILE = "trainer_state.pt"
# sha256 of each file of a checkpoint as saved, checked before a checkpoint is used again.
CHECKSUM_FILE = "checksums.json"
METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "train_config.json"

# The trainer state this process saved last, with the identity (path, size, mtime) of the
# file it went to: the ``renio run`` loop's next ``--init-from`` reads that file back, and
# unpickling it costs more than the iteration's other bookkeeping together. Used once.
_last_saved: tuple[tuple[str, int, int], dict[str, Any]] | None = None


def _file_identity(path: Path) -> tuple[str, int, int]:
    st = path.stat()
    return str(path.resolve()), st.st_size, st.st_mtime_ns


def load_state(path: Path) -> dict[str, Any]:
    """A ``trainer_state.pt``: the state this process just saved there if the file is still
    the one it wrote, else read from disk."""
    global _last_saved
    memo, _last_saved = _last_saved, None
    if memo is not None and memo[0] == _file_identity(path):
        return memo[1]
    return read_state(path)


def read_state(path: Path) -> dict[str, Any]:
    """A ``trainer_state.pt`` from disk, refused in one line when it cannot be read."""
    verify_checkpoint(path.parent, only=(path.name,))
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError) as exc:
        if isinstance(exc, OSError) and not path.exists():
            raise RenioInputError("no trainer state here", file=path) from None
        raise RenioInputError(f"cannot read the trainer state (truncated or damaged?): "
                              f"{exc}", file=path) from None


def verify_checkpoint(ckpt: Path, only: tuple[str, ...] | None = None, *,
                      advice: str = "restore it, or remove the checkpoint and redo what made it",
                      ) -> None:
    """Refuse, in one line naming the file and ending in ``advice``, a checkpoint file whose
    bytes differ from the checksum recorded when it was saved (a copy cut short, a full disk,
    a damaged disk). A file removed since (an older iteration's pruned trainer state) is not
    checked; nor is a checkpoint saved without checksums."""
    try:
        sums = json.loads((ckpt / CHECKSUM_FILE).read_text())
    except FileNotFoundError:
        return
    except (OSError, ValueError) as exc:
        raise RenioInputError(f"cannot read the checkpoint's checksums (damaged?): {exc}",
                              file=ckpt / CHECKSUM_FILE) from None
    for name, want in sorted(sums.items()):
        path = ckpt / name
        if (only is not None and name not in only) or not path.is_file():
            continue
        got = shards.file_content(path)
        if got["sha256"] != want:
            raise RenioInputError(
                f"damaged: its {got['size']:,} bytes do not match the sha256 recorded when "
                f"the checkpoint was saved ({CHECKSUM_FILE}); {advice}", file=path)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _optim_by_name(sd: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """An ``optimizer.state_dict()`` (parameters by index, as saved without FSDP) keyed by
    parameter name instead, as FSDP's full optimizer state dict is; other forms unchanged.
    (Without FSDP, ``load_state_dict`` takes either form: it matches parameters by order.)"""
    groups = sd.get("param_groups") or []
    if not groups or not groups[0]["params"] or not isinstance(groups[0]["params"][0], int):
        return sd
    return {"state": {names[i]: v for i, v in sd["state"].items()},
            "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in groups]}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # someone else's process, or not a pid we can judge: leave it alone
    return True


def recover_interrupted_save(out: Path) -> bool:
    """Finish or clean up a save that a kill interrupted, before anything reads ``out``.

    ``swap_dir`` renames ``out`` to ``.NAME.old-PID`` and then the complete
    ``.NAME.tmp-PID`` to ``out``. Killed between the two, ``out`` is missing and both exist:
    the tmp is the newer complete checkpoint, and it is put in place. Leftovers of dead
    processes (a tmp killed while being written, an old one not yet removed) are deleted.
    Safe when several ranks call it at once. Returns whether a checkpoint was put back."""
    parent = out.parent
    if not parent.is_dir():
        return False
    dead: dict[str, list[Path]] = {"tmp": [], "old": []}
    for kind in dead:
        for path in parent.glob(f".{out.name}.{kind}-*"):
            pid = path.name.rsplit("-", 1)[-1]
            if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
                dead[kind].append(path)
    restored = False
    if not out.exists():
        for old in dead["old"]:
            tmp = parent / f".{out.name}.tmp-{old.name.rsplit('-', 1)[-1]}"
            try:
                os.replace(tmp, out)
                restored = True
                break
            except FileNotFoundError:  # no tmp of that save, or another rank was first
                continue
        if not restored and not out.exists() and dead["old"]:
            # The new checkpoint is gone: the previous one is better than none.
            try:
                os.replace(dead["old"][0], out)
                restored = True
            except FileNotFoundError:
                pass
    for path in dead["tmp"] + dead["old"]:
        shutil.rmtree(path, ignore_errors=True)
    return restored


def swap_dir(tmp: Path, out: Path) -> None:
    """Put a complete checkpoint directory in place: rename, never a half-copied ``out``."""
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def load_optimizer(optimizer: torch.optim.Optimizer, sd: dict[str, Any],
                    module: DistillModule, dist_state: Dist, fsdp: bool) -> None:
    if fsdp and dist_state.on:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_optimizer_state_dict,
        )

        names = [n for n, p in module.named_parameters() if p.requires_grad]
        set_optimizer_state_dict(module, optimizer, _optim_by_name(sd, names),
                                 options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(sd)


def schedule_position(cfg: Any, state: dict[str, Any] | None, total_steps: int,
                      optimizer: torch.optim.Optimizer, module: DistillModule,
                      dist_state: Dist) -> tuple[int, int]:
    """Where this run starts on the learning-rate schedule and the schedule's total steps.

    ``--resume``: the checkpoint's own values. ``--init-from``: continue that checkpoint's
    schedule and AdamW state (loaded here), refusing settings that would silently differ.
    """
    if state is not None:
        return int(state.get("global_offset", 0)), int(state.get("schedule_total") or total_steps)
    if cfg.init_from is None:
        return 0, cfg.schedule_steps or total_steps
    src = Path(cfg.init_from)
    if not (src / STATE_FILE).is_file():
        raise RenioInputError(f"--init-from: no trainer state ({STATE_FILE}) in the checkpoint "
                              "(pruned, or not made by 'renio train')", file=src)
    init = load_state(src / STATE_FILE)
    saved = init.get("data") or {}
    offset = int(init.get("global_step", init.get("step", 0)))
    total = cfg.schedule_steps or int(init.get("schedule_total") or 0) or offset + total_steps
    changed = [f"--{k.replace('_', '-')} {saved.get(k)} (checkpoint) vs {getattr(cfg, k)} (now)"
               for k in ("lr", "warmup_steps", "lr_schedule", "lora", "lora_r", "lora_alpha")
               if k in saved and saved[k] != shards._jsonable(getattr(cfg, k))]
    # A constant rate does not depend on the total (a run may be extended); a decay does.
    if cfg.lr_schedule != "constant" and init.get("schedule_total") and total != init["schedule_total"]:
        changed.append(f"--schedule-steps {init['schedule_total']} (checkpoint) vs {total} (now)")
    if changed:
        raise RenioInputError("--init-from: the checkpoint's optimizer ran with other settings: "
                              + "; ".join(changed), file=src)
    try:
        load_optimizer(optimizer, init["optimizer"], module, dist_state, cfg.fsdp)
    except (ValueError, KeyError) as exc:
        raise RenioInputError(f"--init-from: its optimizer state does not fit this model's "
                              f"trainable parameters ({exc})", file=src) from None
    for group in optimizer.param_groups:  # the schedule is re-applied from the base rate
        group["lr"] = group["initial_lr"] = cfg.lr
    return offset, total


def save_adapter(model: Any, out: Path) -> None:
    """The files of peft's ``save_pretrained`` that loading needs (adapter weights and
    config), without the model card it renders from a template on every save: the
    ``renio run`` loop saves once per optimizer step."""
    # peft and safetensors are imported when used: importing peft takes seconds, which every
    # ``renio`` command (``--help`` included) would otherwise pay.
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    # The base's embeddings are never trained or resized here, so they are not saved; peft's
    # "auto" would read the base model's config again on every save (and, for a Hub name,
    # ask the Hub whether it exists) to find that out.
    state = get_peft_model_state_dict(model, save_embedding_layers=False)
    save_file({k: v.detach().contiguous() for k, v in state.items()},
              str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = copy.copy(model.peft_config["default"])
    config.inference_mode = True
    # peft keeps target_modules as a set, whose order changes with each process's string
    # hashing; sorted, two runs with one seed write the same bytes.
    for key, value in vars(config).items():
        if isinstance(value, (set, frozenset)):
            setattr(config, key, sorted(value))
    config.save_pretrained(str(out))


def save_checkpoint(cfg: Any, module: DistillModule, optimizer: torch.optim.Optimizer,
                     scheduler: Any, tok: Any, out: Path, step: int, dist_state: Dist,
                     inputs: shards.InputSet, temperature: float, teacher_name: str | None,
                     schedule: dict[str, Any] | None = None) -> None:
    """Write the HF-format model or adapter plus the trainer state, then swap it into place."""
    rng_states: list[Any] = [rng_state()]
    model_sd = optim_sd = None
    if dist_state.on:
        gathered: list[Any] = [None] * dist_state.world
        dist.all_gather_object(gathered, rng_states[0])
        rng_states = gathered
        if cfg.fsdp:
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                get_model_state_dict,
                get_optimizer_state_dict,
            )

            opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
            full = get_model_state_dict(module, options=opts)
            model_sd = {k[len("model."):]: v for k, v in full.items() if k.startswith("model.")}
            # Tied weights (input embeddings = LM head) come back as two copies: point them at
            # one tensor so that save_pretrained drops the duplicate, as it does without FSDP.
            first: dict[int, str] = {}
            for name, param in module.model.named_parameters(remove_duplicate=False):
                key = first.setdefault(id(param), name)
                if key != name and key in model_sd and name in model_sd:
                    model_sd[name] = model_sd[key]
            optim_sd = get_optimizer_state_dict(module, optimizer, options=opts)
    if not dist_state.main:
        if dist_state.on:
                dist.barrier()
        return
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    try:
        _write_checkpoint(cfg, module, optimizer, scheduler, tok, out, tmp, step, dist_state,
                          inputs, temperature, teacher_name, schedule, rng_states, model_sd,
                          optim_sd)
    except BaseException as exc:
        # A half-written checkpoint would fill the disk further; ``out`` is still the
        # previous one, untouched.
        shutil.rmtree(tmp, ignore_errors=True)
        named = shards.write_error(exc, out)
        if named is None:
            raise
        raise named from None
    if dist_state.on:
        dist.barrier()


def _write_checkpoint(cfg: Any, module: DistillModule, optimizer: torch.optim.Optimizer,
                      scheduler: Any, tok: Any, out: Path, tmp: Path, step: int, dist_state: Dist,
                      inputs: shards.InputSet, temperature: float, teacher_name: str | None,
                      schedule: dict[str, Any] | None, rng_states: list[Any],
                      model_sd: dict[str, Any] | None, optim_sd: dict[str, Any] | None) -> None:
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model = module.model
    if model_sd is not None:
        model.save_pretrained(str(tmp), state_dict=model_sd)
    elif models.has_adapter(model):
        save_adapter(model, tmp)
    else:
        model.save_pretrained(str(tmp))
    tok.save_pretrained(str(tmp))
    state = {
        "step": step,
        "optimizer": optim_sd if optim_sd is not None else optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": rng_states,
        "data": cfg.data_fields(),
        "data_content": cfg.data_content(),
        "input_fingerprint": shards.input_fingerprint(inputs.fingerprint()),
        "world_size": dist_state.world,
        **(schedule or {}),
        "global_step": (schedule or {}).get("global_offset", 0) + step,
    }
    torch.save(state, tmp / STATE_FILE)
    info = {"step": step, "finished": bool((schedule or {}).get("finished", True)),
            "config": shards._jsonable(cfg), "temperature": temperature,
            "teacher": teacher_name, "base_model": cfg.model, "lora": cfg.lora,
            "upstream": inputs.metadata}
    (tmp / CONFIG_FILE).write_text(json.dumps(info, indent=2, default=str) + "\n")
    sums = {p.name: shards.file_content(p)["sha256"] for p in sorted(tmp.iterdir()) if p.is_file()}
    (tmp / CHECKSUM_FILE).write_text(json.dumps(sums, indent=2, sort_keys=True) + "\n")
    live = out / METRICS_FILE
    if live.exists():
        shutil.copyfile(live, tmp / METRICS_FILE)
    if (out / "tensorboard").is_dir():
        # Moved, not copied: the open event file keeps writing into it after the swap.
        os.replace(out / "tensorboard", tmp / "tensorboard")
    swap_dir(tmp, out)
    global _last_saved
    # A finished run's optimizer steps no more, so its state tensors can be handed on as they
    # are; a mid-run save's would change under the memo.
    _last_saved = ((_file_identity(out / STATE_FILE), state) if info["finished"] and dist_state.main
                   else None)

