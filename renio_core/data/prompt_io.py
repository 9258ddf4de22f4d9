"""Loading prompt sets for ``rollout`` (and ``eval``): jsonl, Parquet, or a ``datasets`` name.

The prompt columns are fixed by docs/design.md ("Input prompts"): ``problem`` (required), ``id``
(the row number when absent), ``solution`` (OPSD's privileged prompt, arXiv 2606.23104),
``answer`` (math grading), ``tests`` (code grading), ``task`` (``math`` or ``code``). Every
problem is reported as one :class:`RenioInputError` naming file, row and column before any
model is loaded. Other columns are ignored.

A ``datasets`` source is written ``NAME[:CONFIG][@SPLIT]`` (split ``train`` by default) and
is only tried when no file of that name exists.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from renio_core.data import shards
from renio_core.data.prompts import TASKS
from renio_core.errors import RenioInputError

OPTIONAL_TEXT = ("solution", "answer", "tests")


@dataclasses.dataclass
class Prompt:
    id: str
    problem: str
    solution: str | None = None
    answer: str | None = None
    tests: str | None = None
    task: str | None = None


@dataclasses.dataclass
class PromptSet:
    prompts: list[Prompt]
    source: str  # what the user gave, for messages and metadata
    files: list[str]

    def fingerprint(self) -> str:
        """Content identity: resuming is safe exactly when the prompts did not change."""
        return shards.fingerprint_of([dataclasses.astuple(p) for p in self.prompts])

    def __len__(self) -> int:
        return len(self.prompts)


def _records_from_jsonl(path: Path) -> list[dict[str, Any]]:
    try:
        # split("\n"), not splitlines(): JSON text may hold U+2028 inside a string.
        lines = path.read_text(encoding="utf-8").split("\n")
    except UnicodeDecodeError as exc:
        raise RenioInputError(f"not UTF-8 text (byte {exc.start}); save the prompts as UTF-8",
                              file=path) from None
    records = []
    for lineno, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise RenioInputError(f"not valid JSON: {exc.msg}", file=path,
                                  row=lineno) from None
        if not isinstance(rec, dict):
            raise RenioInputError("each line must be a JSON object", file=path, row=lineno)
        records.append(rec)
    return records


def _records_from_json(path: Path) -> list[dict[str, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise RenioInputError(f"not UTF-8 text (byte {exc.start}); save the prompts as UTF-8",
                              file=path) from None
    except json.JSONDecodeError as exc:
        raise RenioInputError(f"not valid JSON: {exc.msg}", file=path) from None
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise RenioInputError("a .json prompt file must hold a list of objects", file=path)
    return data


def _records_from_dataset(spec: str) -> list[dict[str, Any]]:
    name, _, split = spec.partition("@")
    name, _, config = name.partition(":")
    try:
        import datasets
    except ImportError:
        raise RenioInputError(
            f"{spec!r} is not a file, and the 'datasets' package is not installed"
        ) from None
    try:
        ds = datasets.load_dataset(name, config or None, split=split or "train")
    except Exception as exc:  # noqa: BLE001 - datasets raises many types; all mean "bad name"
        raise RenioInputError(
            f"{spec!r} is neither a file nor a loadable dataset: {type(exc).__name__}: {exc}"
        ) from None
    return [dict(r) for r in ds]


def _as_text(value: Any, *, file: str, row: int, column: str, required: bool) -> str | None:
    if value is None or (isinstance(value, float) and value != value):
        if required:
            raise RenioInputError("missing value where one is required", file=file, row=row,
                                  column=column)
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise RenioInputError(f"expected a string, found {type(value).__name__}", file=file,
                              row=row, column=column)
    return value


def validate_records(records: list[dict[str, Any]], where: str) -> list[Prompt]:
    if not records:
        raise RenioInputError("no prompts: the input is empty", file=where)
    if not any("problem" in r for r in records):
        raise RenioInputError("missing column, expected string (the prompt text)", file=where,
                              column="problem")
    prompts: list[Prompt] = []
    seen: dict[str, int] = {}
    for i, rec in enumerate(records):
        problem = _as_text(rec.get("problem"), file=where, row=i, column="problem",
                           required=True)
        if not problem.strip():
            raise RenioInputError("empty problem", file=where, row=i, column="problem")
        pid = _as_text(rec.get("id"), file=where, row=i, column="id", required=False)
        pid = str(i) if pid is None else pid
        if pid in seen:
            raise RenioInputError(f"duplicate id {pid!r} (first at row {seen[pid]})",
                                  file=where, row=i, column="id")
        seen[pid] = i
        extra = {c: _as_text(rec.get(c), file=where, row=i, column=c, required=False)
                 for c in OPTIONAL_TEXT}
        task = _as_text(rec.get("task"), file=where, row=i, column="task", required=False)
        if task is not None and task not in TASKS:
            raise RenioInputError(f"task must be one of {', '.join(TASKS)}, got {task!r}",
                                  file=where, row=i, column="task")
        prompts.append(Prompt(id=pid, problem=problem, task=task, **extra))
    return prompts


def load_prompts(spec: str | os.PathLike) -> PromptSet:
    """Read and validate a prompt set. Raises :class:`RenioInputError` on any bad row."""
    text = os.fspath(spec)
    path = Path(text)
    if path.is_file() and path.suffix in (".jsonl", ".json"):
        records = _records_from_jsonl(path) if path.suffix == ".jsonl" else _records_from_json(path)
        return PromptSet(validate_records(records, text), text, [str(path.resolve())])
    looks_parquet = path.is_dir() or path.suffix == ".parquet" or any(c in text for c in "*?[")
    if looks_parquet:
        files = shards.resolve_inputs(text)
        records = []
        for f in files:
            table = shards.open_parquet(f).read()
            records.extend(table.to_pylist())
        where = str(files[0]) if len(files) == 1 else text
        return PromptSet(validate_records(records, where), text, [str(f.resolve()) for f in files])
    if path.is_file():
        raise RenioInputError("prompt files must be .jsonl, .json or .parquet", file=text)
    if path.suffix in (".jsonl", ".json", ".parquet") or os.sep in text:
        raise RenioInputError("no such file or directory", file=text)
    return PromptSet(validate_records(_records_from_dataset(text), text), text, [])
