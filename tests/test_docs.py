"""docs/design.md names the function behind each statement (``stages.train.run_train``, modules
under ``renio_core/``): every such name must exist in the code."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

DESIGN = Path(__file__).resolve().parents[1] / "docs" / "design.md"
PACKAGES = ("formulas", "data", "modeling", "backends", "stages", "grading", "report")


def _cited_names() -> set[str]:
    text = DESIGN.read_text()
    pattern = rf"`((?:{'|'.join(PACKAGES)})\.[A-Za-z_][\w.]*)"
    return {m.rstrip(".") for m in re.findall(pattern, text) if not m.endswith(".py")}


def _resolves(dotted: str) -> bool:
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):  # the longest importable module, then attributes
        try:
            obj = importlib.import_module("renio_core." + ".".join(parts[:cut]))
        except ImportError:
            continue
        try:
            for attr in parts[cut:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return False
        return True
    return False


def test_every_name_the_design_document_cites_exists() -> None:
    names = _cited_names()
    assert len(names) > 50  # the document cites its sources throughout
    missing = sorted(n for n in names if not _resolves(n))
    assert not missing, f"docs/design.md cites names the code does not have: {missing}"
