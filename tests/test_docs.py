"""docs/design.md names the function behind each statement (``stages.train.run_train``, modules
under ``renio_core/``): every such name must exist in the code."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

DESIGN = Path(__file__).resolve().parents[1] / "docs" / "design.md"
PACKAGES = ("formulas", "data", "modeling", "backends", "stages", "training", "run", "grading",
            "report")


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


# The README and the pages it points to: links resolve, cited files exist, benchmark commands
# use options their scripts take, and the README stays short.

ROOT = DESIGN.parents[1]
README = ROOT / "README.md"
README_MAX_LINES = 260
# docs/replication.md and docs/addition-world-evidence.md are written by the scripts in
# experiments/; every other page is written by hand.
GENERATED = {"replication.md", "addition-world-evidence.md"}
HAND_WRITTEN = [README, *sorted(p for p in (ROOT / "docs").glob("*.md") if p.name not in GENERATED)]
LINK = re.compile(r"\]\(([^)\s]+)\)")
CITED_PATH = re.compile(
    r"`((?:benchmarks|experiments|examples|sample_configs|tests|\.ci)/[\w./-]+)`")
BENCH_COMMAND = re.compile(r"python (benchmarks/\w+\.py)((?:\s+(?:--[\w-]+|[\w.]+))*)")
HISTORY = re.compile(r"\bissue \d+|\bBefore, |\bused to\b|\bno longer\b|\bA rerun after\b"
                     r"|\bearlier (?:version|runs?)\b")


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # no headings inside code
    return {_slug(h) for h in re.findall(r"^#{1,6} (.+)$", text, flags=re.M)}


def _broken_links(page: Path) -> list[str]:
    broken = []
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+:", target):
            continue  # a web address
        file_part, _, anchor = target.partition("#")
        dest = (page.parent / file_part).resolve() if file_part else page
        if not dest.is_file():
            broken.append(f"{target} (no file {dest})")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{target} (no heading #{anchor} in {dest.name})")
    return broken


def test_readme_is_short() -> None:
    lines = len(README.read_text().splitlines())
    assert lines <= README_MAX_LINES, (
        f"README.md has {lines} lines (at most {README_MAX_LINES}): move detail to docs/")


def test_readme_links_every_docs_page_and_each_link_resolves() -> None:
    targets = {t.partition("#")[0] for t in LINK.findall(README.read_text())}
    pages = {f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md")}
    assert not pages - targets, f"README.md links no page for {sorted(pages - targets)}"
    for page in HAND_WRITTEN + [ROOT / "docs" / name for name in sorted(GENERATED)]:
        assert not _broken_links(page), f"{page.name}: broken links {_broken_links(page)}"


def test_files_the_docs_cite_exist() -> None:
    missing = [f"{page.name}: {path}" for page in HAND_WRITTEN
               for path in CITED_PATH.findall(page.read_text())
               if "*" not in path and not (ROOT / path.rstrip("/")).exists()]
    assert not missing, f"the docs cite files that do not exist: {missing}"


def test_benchmark_commands_use_options_their_scripts_take() -> None:
    commands = [(page.name, m) for page in HAND_WRITTEN
                for m in BENCH_COMMAND.findall(" ".join(page.read_text().split()))]
    scripts = {script for _, (script, _) in commands}
    assert {"benchmarks/bench_weight.py", "benchmarks/bench_peer.py"} <= scripts
    unknown = []
    for page, (script, args) in commands:  # argparse options appear quoted in their script
        source = (ROOT / script).read_text()
        unknown += [f"{page}: {script} {flag}" for flag in re.findall(r"--[\w-]+", args)
                    if f'"{flag}"' not in source]
    assert not unknown, f"benchmark commands with options their scripts do not take: {unknown}"


def test_hand_written_docs_hold_no_history() -> None:
    found = [f"{page.name}:{n}: {line.strip()}" for page in HAND_WRITTEN
             for n, line in enumerate(page.read_text().splitlines(), 1) if HISTORY.search(line)]
    assert not found, "history belongs in the git log, not in the docs: " + "; ".join(found)
