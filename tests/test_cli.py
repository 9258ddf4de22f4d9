"""The ``renio`` command line as a whole: the command list, and options that agree with the
stages' config dataclasses."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from typing import Any, NamedTuple

import click
import pytest
import typer.main
from rich.markup import escape

from renio_cli import (
    eval_cmd,
    main,
    rollout_cmd,
    score_cmd,
    train_cmd,
    weight_cmd,
)
from renio_core.report import inspect_report
from renio_core.run.config import RunConfig


def test_help_lists_commands_in_pipeline_order() -> None:
    out = subprocess.run([sys.executable, "-m", "renio_cli.main", "--help"], capture_output=True,
                         text=True, check=True, env={**os.environ, "COLUMNS": "120"}).stdout
    listed = re.findall(r"^│ (\w+)\s{2,}", out, flags=re.M)
    assert listed == ["toy", "rollout", "score", "weight", "train", "eval", "inspect", "run"]


# --------------------------------------------------------------------------------------------
# Each option written once: a command's option takes its default and help from the field of
# the stage's config dataclass (renio_cli.options.config_options); nothing here may drift.
# --------------------------------------------------------------------------------------------

REQUIRED = "<required>"  # a required option (typer's ...) or a field without a default


class Spec(NamedTuple):
    config: type | None  # the config dataclass the command builds, if any
    cli_only: frozenset[str]  # parameters (Python names) that are no field of ``config``
    field_only: frozenset[str]  # fields with no option on this command
    default_differs: dict[str, str]  # parameter -> why its CLI default is not the field's
    renamed: dict[str, str] | None = None  # parameter -> field, where the names differ


SPECS: dict[str, Spec] = {
    "rollout": Spec(
        rollout_cmd.RolloutConfig, frozenset({"config"}), frozenset(),
        dict.fromkeys(("model", "prompts", "out"),
                      "required on the command line; the field's '' is a placeholder the "
                      "config rejects")),
    "score": Spec(
        score_cmd.ScoreConfig, frozenset({"config"}), frozenset(),
        dict.fromkeys(("input_", "teacher", "out"),
                      "required on the command line; the field's '' is a placeholder the "
                      "config rejects")),
    "weight": Spec(
        weight_cmd.WeightConfig, frozenset({"config"}), frozenset(),
        dict.fromkeys(("input_", "out"),
                      "required on the command line; the field's '' is a placeholder the "
                      "config rejects")),
    "train": Spec(
        train_cmd.TrainConfig, frozenset({"config"}), frozenset(),
        {"lora_targets": "the flag is comma-separated text; the field a tuple (it also "
                         "accepts the text)"}),
    "eval": Spec(
        eval_cmd.EvalConfig, frozenset({"runs", "compare_", "config"}), frozenset(),
        dict.fromkeys(("bench", "out"),
                      "None, not required: --compare takes neither; the command passes '' on "
                      "to the config, which rejects it")),
    # No config dataclass: every option is the command's own.
    "inspect": Spec(
        None,
        frozenset({"shard_paths", "row", "prompt_id", "top", "sort", "html", "max_rows", "diff",
                   "tokenizer", "clip", "threshold", "worst", "overwrite", "config"}),
        frozenset(), {}),
    # RunConfig is set by the YAML and key=value overrides, which reach every field by name.
    "run": Spec(
        RunConfig, frozenset({"overrides", "config"}),
        frozenset(f.name for f in dataclasses.fields(RunConfig)), {}),
    "toy build": Spec(
        None, frozenset({"out", "seed", "quick", "overwrite", "cache_dir", "world_name"}),
        frozenset(), {}),
}

# Options whose field does not carry its help yet (strict xfail: a fixed one fails until it is
# removed from here). Empty: every stage's fields carry their help.
TRAIN_HELP_PENDING: frozenset[str] = frozenset()


def _command(name: str) -> click.Command:
    cmd: Any = typer.main.get_command(main.app)
    for part in name.split():
        cmd = cmd.commands[part]
    return cmd


def _field_name(command: str, param: str) -> str:
    return (SPECS[command].renamed or {}).get(param, param.rstrip("_"))


def _fields(command: str) -> dict[str, dataclasses.Field]:
    config = SPECS[command].config
    return {f.name: f for f in dataclasses.fields(config)} if config else {}


def _mapped(command: str) -> list[click.Parameter]:
    """The command's parameters that are fields of its config dataclass."""
    fields = _fields(command)
    return [p for p in _command(command).params
            if p.name not in SPECS[command].cli_only and _field_name(command, p.name) in fields]


def _cli_default(param: click.Parameter) -> Any:
    return REQUIRED if param.required else param.default


def _field_default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return REQUIRED


def _cases(with_marks: bool) -> list[Any]:
    cases = []
    for command in SPECS:
        for p in _mapped(command):
            marks = ()
            if with_marks and command == "train" and p.name in TRAIN_HELP_PENDING:
                marks = pytest.mark.xfail(
                    strict=True, reason=f"TrainConfig.{p.name} has no metadata['help'] yet "
                                        "(TRAIN_HELP_PENDING)")
            cases.append(pytest.param(command, p.name, id=f"{command}-{p.name}", marks=marks))
    return cases


@pytest.mark.parametrize("command", list(SPECS))
def test_every_option_and_field_is_accounted_for(command: str) -> None:
    spec = SPECS[command]
    params = {p.name for p in _command(command).params}
    fields = set(_fields(command))
    mapped = {p.name for p in _mapped(command)}
    assert params - mapped == spec.cli_only, "options that are no config field"
    assert fields - {_field_name(command, p) for p in mapped} == spec.field_only, \
        "config fields with no option"
    assert set(spec.default_differs) <= mapped
    assert set(spec.renamed or {}) <= mapped


@pytest.mark.parametrize(("command", "param"), _cases(with_marks=False))
def test_option_default_is_the_fields(command: str, param: str) -> None:
    option = next(p for p in _command(command).params if p.name == param)
    field = _fields(command)[_field_name(command, param)]
    why = SPECS[command].default_differs.get(param)
    if why is None:
        assert _cli_default(option) == _field_default(field)
    else:  # an intentional difference must still be one
        assert _cli_default(option) != _field_default(field), f"no longer differs ({why})"


@pytest.mark.parametrize(("command", "param"), _cases(with_marks=True))
def test_option_help_is_the_fields(command: str, param: str) -> None:
    option = next(p for p in _command(command).params if p.name == param)
    field = _fields(command)[_field_name(command, param)]
    assert "help" in field.metadata, f"{field.name} has no metadata['help']"
    assert option.help == escape(field.metadata["help"])  # escaped for rich, shown as written


def test_inspect_falls_back_to_the_weight_stages_defaults() -> None:
    weight = _fields("weight")
    assert inspect_report.DEFAULT_CLIP == weight["clip"].default
    assert inspect_report.DEFAULT_THRESHOLD == weight["threshold"].default
    helps = {p.name: p.help for p in _command("inspect").params}
    assert f"else {weight['clip'].default:g}." in helps["clip"]
    assert f"else {weight['threshold'].default:g}." in helps["threshold"]


def test_core_stages_import_neither_typer_nor_rich() -> None:
    code = ("import sys; import renio_core.stages.rollout, renio_core.stages.score, "
            "renio_core.stages.weight, renio_core.stages.evaluate, renio_core.run.loop; "
            "print(sorted(m for m in ('typer', 'rich', 'click') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"


# --------------------------------------------------------------------------------------------
# Models bigger than one GPU: the refusals a CPU machine gives, through the real command
# --------------------------------------------------------------------------------------------


def _refused(args: list[str], out: Any) -> str:
    """Run ``renio ARGS``; it must exit 2 with one stderr line and write nothing at ``out``."""
    proc = subprocess.run([sys.executable, "-m", "renio_cli.main", *args], capture_output=True,
                          text=True, env={**os.environ, "COLUMNS": "200"}, check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1, proc.stderr
    assert not os.path.exists(out)
    return lines[0]


@pytest.fixture()
def prompts_file(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"id": "p0", "problem": "1+1?"}\n')
    return path


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="the CPU refusal")
@pytest.mark.parametrize("command", ["rollout", "score", "eval"])
def test_device_map_auto_is_refused_on_a_cpu(command, tmp_path, prompts_file):
    out = tmp_path / "out.parquet"
    args = {"rollout": ["rollout", "--model", "toy:student", "--prompts", str(prompts_file)],
            "score": ["score", "--in", str(tmp_path / "rollouts.parquet"),
                      "--teacher", "toy:teacher"],
            "eval": ["eval", "--bench", str(prompts_file), "--model", "toy:student"]}[command]
    line = _refused([*args, "--out", str(out), "--device-map", "auto"], out)
    assert "--device-map: auto needs CUDA GPUs; on a CPU leave it unset" in line


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="the CPU refusal")
def test_train_teacher_device_map_auto_is_refused_on_a_cpu(tmp_path):
    out = tmp_path / "ckpt"
    line = _refused(["train", "--weights", str(tmp_path / "w.parquet"), "--model", "toy:student",
                     "--out", str(out), "--teacher", "toy:teacher",
                     "--teacher-device-map", "auto"], out)
    assert "--teacher-device-map: auto needs CUDA GPUs; on a CPU leave it unset" in line


@pytest.mark.parametrize("command", ["rollout", "score", "eval"])
def test_tensor_parallel_above_one_is_refused_with_the_hf_backend(command, tmp_path,
                                                                   prompts_file):
    out = tmp_path / "out.parquet"
    args = {"rollout": ["rollout", "--model", "toy:student", "--prompts", str(prompts_file)],
            "score": ["score", "--in", str(tmp_path / "rollouts.parquet"),
                      "--teacher", "toy:teacher"],
            "eval": ["eval", "--bench", str(prompts_file), "--model", "toy:student"]}[command]
    line = _refused([*args, "--out", str(out), "--tensor-parallel-size", "2"], out)
    assert "--tensor-parallel-size 2: needs --backend vllm" in line
    line = _refused([*args, "--out", str(out), "--tensor-parallel-size", "0"], out)
    assert "--tensor-parallel-size: must be an integer >= 1, got 0" in line


def test_help_text_with_brackets_is_shown_as_written() -> None:
    # rich reads "[wandb]" as a markup tag; the option's help must still show it.
    out = subprocess.run([sys.executable, "-m", "renio_cli.main", "train", "--help"],
                         capture_output=True, text=True, env={**os.environ, "COLUMNS": "300"},
                         check=True).stdout
    assert "pip install 'renio[wandb]'" in out


@pytest.mark.parametrize("command", [c for c in SPECS if SPECS[c].config is not None])
def test_yaml_config_accepts_every_field_name(command: str, tmp_path) -> None:
    # --config keys are the config dataclass's field names (or the flags): every field that is
    # an option of the command is accepted under its field name.
    from renio_cli.common import load_yaml_defaults

    names = sorted(set(_fields(command)) - SPECS[command].field_only)
    path = tmp_path / "c.yaml"
    path.write_text("".join(f"{name}: null\n" for name in names))
    ctx = click.Context(_command(command))
    load_yaml_defaults(ctx, None, path)  # an unknown key would exit with "unknown key"
    assert len(ctx.default_map) == len(names)
