"""Run untrusted generated code against a benchmark's tests, with a verdict it cannot forge.

Code benchmarks in the paper (arXiv 2606.23104) are graded by executing the model's program
with the benchmark's tests. A model being distilled on code writes anything, so renio keeps
two things apart:

* **The candidate** (the completion's code, after the benchmark's ``prelude``) runs in a
  separate process, isolated by the operating system through bubblewrap (``bwrap``):
  a clean environment; no network (its own network namespace); a read-only view of only
  what Python needs (``/usr``, the interpreter's prefix, a few ``/etc`` files); a private
  64 MiB tmpfs ``/tmp`` as its working directory, HOME and TMPDIR, gone when it ends; its own
  PID, IPC and UTS namespaces, so nothing outside can be seen or signalled, and every process
  it starts dies with it; and resource limits on address space, CPU seconds, file size, open
  files and the number of processes. When renio runs as root, the candidate drops to a
  fresh unprivileged uid of its own inside the sandbox (the kernel never applies the process
  limit to uid 0); otherwise bwrap puts it in a new user namespace.
* **The tests** run in the grader, outside the candidate's process. They call the
  candidate's functions through proxies: the arguments and the result cross a pipe as plain
  data (JSON with tags for tuples, sets, dicts and bytes; only None, bool, int, float,
  complex, str, bytes and containers of them are accepted on the way back), so an object with
  a rigged ``__eq__`` cannot cross, and nothing the candidate prints or exits with is a
  verdict. A program passes only if the grader's own run of the tests ends without an
  exception within the time limit.

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

from renio_core.grading.grader import extract_last_code_block

DEFAULT_TIMEOUT_S = 10.0
DEFAULT_MEMORY_MB = 1024
DEFAULT_FILE_SIZE_MB = 16
DEFAULT_MAX_PROCESSES = 8  # processes and threads together, the sandbox's own init included
TMP_SIZE_MB = 64
MAX_MESSAGE_BYTES = 16 * 1024 * 1024  # one reply from the candidate
MAX_OUTPUT_BYTES = 8 * 1024 * 1024  # stdout + stderr of one program
MAX_DEPTH = 100  # nesting of one value crossing the pipe
ISOLATIONS = ("bwrap", "inprocess")
_OUTPUT_TAIL = 2000

# The candidate's side, run as ``python -I -S -B -c _RUNNER CONFIG_JSON``. It sets its limits (and
# drops to its own uid when started as root), reads the program, runs it, reports the names of
# its callables, then answers calls until the grader closes the pipe. Nothing it sends is
# trusted: the grader decodes plain data only.
_RUNNER = r'''
import json, os, sys, resource

_cfg = json.loads(sys.argv[1])
sys.path.extend(_cfg["path"])  # site-packages without running .pth files (-S: faster start)
for _which, _value in _cfg["limits"].items():
    try:
        resource.setrlimit(getattr(resource, _which), (_value, _value))
    except (ValueError, OSError):
        pass  # a hard limit already lower than ours stays as it is
if _cfg["uid"] >= 0:
    os.setgroups([])
    os.setresgid(_cfg["uid"], _cfg["uid"], _cfg["uid"])
    os.setresuid(_cfg["uid"], _cfg["uid"], _cfg["uid"])
_rfd, _wfd = _cfg["rfd"], _cfg["wfd"]


def _read_exact(n):
    chunks = []
    while n:
        chunk = os.read(_rfd, min(n, 1 << 20))
        if not chunk:
            os._exit(0)  # the grader is done
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def _recv():
    return json.loads(_read_exact(int.from_bytes(_read_exact(4), "big")))


def _send(obj):
    data = json.dumps(obj).encode("ascii")
    data = len(data).to_bytes(4, "big") + data
    while data:
        data = data[os.write(_wfd, data):]


def _encode(x):
    t = type(x)
    if x is None or t is bool or t is int or t is float or t is str:
        return x
    if t is list:
        return ["L"] + [_encode(v) for v in x]
    if t is tuple:
        return ["T"] + [_encode(v) for v in x]
    if t is dict:
        out = ["D"]
        for k, v in x.items():
            out += [_encode(k), _encode(v)]
        return out
    if t is set or t is frozenset:
        return ["S" if t is set else "F"] + [_encode(v) for v in x]
    if t is bytes:
        return ["B", x.hex()]
    if t is complex:
        return ["C", x.real, x.imag]
    if t.__module__ == "numpy" and hasattr(x, "tolist"):
        return _encode(x.tolist())
    for base in (bool, int, float, str, complex, bytes, tuple, list, dict, frozenset, set):
        if isinstance(x, base):
            return _encode(base(x))
    raise TypeError(f"a {t.__name__} is not plain data")


def _decode(v):
    if type(v) is list:
        tag, items = v[0], v[1:]
        if tag == "B":
            return bytes.fromhex(items[0])
        if tag == "C":
            return complex(items[0], items[1])
        items = [_decode(i) for i in items]
        if tag == "D":
            return dict(zip(items[0::2], items[1::2]))
        return {"L": list, "T": tuple, "S": set, "F": frozenset}[tag](items)
    return v


if _cfg["guard"]:
    exec(_cfg["guard"], {"__name__": "_renio_guard", "_root": os.getcwd()})
_program = _recv()["program"]
_ns = {"__name__": "solution", "__builtins__": __builtins__}
try:
    exec(compile(_program, "solution.py", "exec"), _ns)
except BaseException as _exc:
    import traceback
    traceback.print_exc()
    sys.stderr.flush()
    _send({"loaded": False, "error": type(_exc).__name__})
    os._exit(3)
_names = [k for k, v in list(_ns.items()) if type(k) is str and not k.startswith("__") and callable(v)]
sys.stdout.flush()
_send({"loaded": True, "names": _names})
while True:
    _msg = _recv()
    try:
        _fn = _ns[_msg["call"]]
        _result = _fn(*_decode(_msg["args"]), **_decode(_msg["kwargs"]))
        _reply = {"value": _encode(_result)}
    except BaseException as _exc:
        try:
            _text = str(_exc)[:500]
        except BaseException:
            _text = ""
        _reply = {"raised": type(_exc).__name__, "message": _text}
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:
        pass
    try:
        _send(_reply)
    except (TypeError, ValueError, RecursionError):
        _send({"raised": "TypeError", "message": "the result is not plain data"})
'''

# The in-process guard (``inprocess`` isolation only): an audit hook installed in the
# candidate's process before its code runs. ``_root`` is the working directory.
_GUARD = r'''
import os, sys

_root = os.path.realpath(_root)
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_ALLOWED_OUTSIDE = {"/dev/null"}
_BLOCKED = {
    "os.fork", "os.forkpty", "os.exec", "os.posix_spawn", "os.spawn", "os.system",
    "subprocess.Popen", "os.kill", "os.killpg", "signal.pthread_kill",
    "socket.__new__", "socket.connect", "socket.bind", "socket.getaddrinfo",
    "socket.sendto", "socket.sendmsg", "os.symlink", "os.link",
    "os.setxattr", "os.removexattr", "os.chflags", "os.lchflags", "os.chown",
}
_PATH_EVENTS = {
    "os.remove": (0,), "os.rmdir": (0,), "os.mkdir": (0,), "os.rename": (0, 1),
    "os.chmod": (0,), "os.utime": (0,), "os.truncate": (0,),
    "shutil.rmtree": (0,), "shutil.copyfile": (1,), "shutil.copymode": (1,),
    "shutil.copystat": (1,), "shutil.move": (1,), "shutil.chown": (0,),
}
_DIR_FD_EVENTS = {"os.remove", "os.rmdir", "os.mkdir", "os.chmod", "os.utime", "shutil.rmtree"}


def _inside(path):
    if isinstance(path, int):
        return True
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    full = os.path.realpath(os.path.join(os.getcwd(), os.fspath(path)))
    return full in _ALLOWED_OUTSIDE or full == _root or full.startswith(_root + os.sep)


import _posixsubprocess


def _no_fork_exec(*args, **kwargs):
    raise PermissionError("sandbox: creating processes is not allowed")


_posixsubprocess.fork_exec = _no_fork_exec
_BLOCKED_IMPORTS = {"_posixsubprocess", "_ctypes"}


def _hook(event, args):
    if event == "import":
        if args[0] in _BLOCKED_IMPORTS:
            raise ImportError(f"sandbox: importing {args[0]} is not allowed")
        return
    if event == "open":
        path, mode, flags = args
        if path is None:
            return
        writing = (mode is not None and any(c in mode for c in "wax+")) or (
            mode is None and flags & _WRITE_FLAGS)
        if writing and not _inside(path):
            raise PermissionError(f"sandbox: writing outside the sandbox is not allowed: {path!r}")
        return
    if event in _BLOCKED:
        raise PermissionError(f"sandbox: {event} is not allowed")
    idx = _PATH_EVENTS.get(event)
    if idx is not None:
        if event in _DIR_FD_EVENTS and args and args[-1] not in (None, -1):
            raise PermissionError(f"sandbox: {event} with dir_fd is not allowed")
        if event == "os.rename" and (args[2] not in (None, -1) or args[3] not in (None, -1)):
            raise PermissionError("sandbox: os.rename with dir_fd is not allowed")
        for i in idx:
            if i < len(args) and args[i] is not None and not _inside(args[i]):
                raise PermissionError(f"sandbox: {event} outside the sandbox is not allowed")


sys.addaudithook(_hook)
'''


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


# --------------------------------------------------------------------------------------------
# Plain data across the pipe (the grader's side)
# --------------------------------------------------------------------------------------------


def _encode(x: Any, depth: int = 0) -> Any:
    """The test's arguments -> tagged JSON. Plain data only."""
    if depth > MAX_DEPTH:
        raise TypeError("renio sandbox: argument nested too deeply")
    t = type(x)
    if x is None or t in (bool, int, float, str):
        return x
    if t in (list, tuple, set, frozenset):
        tag = {list: "L", tuple: "T", set: "S", frozenset: "F"}[t]
        return [tag] + [_encode(v, depth + 1) for v in x]
    if t is dict:
        out: list[Any] = ["D"]
        for k, v in x.items():
            out += [_encode(k, depth + 1), _encode(v, depth + 1)]
        return out
    if t is bytes:
        return ["B", x.hex()]
    if t is complex:
        return ["C", x.real, x.imag]
    for base in (bool, int, float, str, tuple, list, dict):
        if isinstance(x, base):
            return _encode(base(x), depth)
    raise TypeError(f"renio sandbox: a {t.__name__} argument cannot be passed to the candidate")


def _decode(v: Any, depth: int = 0) -> Any:
    """Tagged JSON from the candidate -> genuine plain objects, or ValueError."""
    if depth > MAX_DEPTH:
        raise ValueError("nested too deeply")
    t = type(v)
    if v is None or t in (bool, int, float, str):
        return v
    if t is not list or not v or type(v[0]) is not str:
        raise ValueError("not plain data")
    tag, items = v[0], v[1:]
    if tag == "B" and len(items) == 1 and type(items[0]) is str:
        return bytes.fromhex(items[0])
    if tag == "C" and len(items) == 2 and all(type(i) in (int, float) for i in items):
        return complex(items[0], items[1])
    values = [_decode(i, depth + 1) for i in items]
    if tag == "L":
        return values
    if tag == "T":
        return tuple(values)
    if tag == "S":
        return set(values)
    if tag == "F":
        return frozenset(values)
    if tag == "D" and len(values) % 2 == 0:
        return dict(zip(values[0::2], values[1::2]))
    raise ValueError("not plain data")


def _frame(obj: Any) -> bytes:
    data = json.dumps(obj).encode("ascii")
    return len(data).to_bytes(4, "big") + data


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
        pending = _frame(request) if request is not None else b""
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
        request = {"call": name, "args": _encode(list(args)), "kwargs": _encode(dict(kwargs))}
        self.calls += 1
        reply = self.exchange(request)
        if type(reply) is not dict:
            raise CandidateError("the candidate's reply is not valid data")
        if "value" in reply:
            try:
                return _decode(reply["value"])
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


def _python_dirs(python: str) -> list[str]:
    """The directories the interpreter needs, read-only: its prefixes and site-packages."""
    dirs = {sys.prefix, sys.exec_prefix, sys.base_prefix, sys.base_exec_prefix,
            os.path.dirname(os.path.dirname(os.path.realpath(python)))}
    dirs.update(site.getsitepackages())
    dirs = {os.path.realpath(d) for d in dirs if os.path.isdir(d)} | {
        d for d in dirs if os.path.isdir(d)}
    keep = sorted(d for d in dirs if d != "/")
    # Drop directories inside another bound one, and anything under /usr (bound whole).
    out: list[str] = []
    for d in keep:
        if d == "/usr" or d.startswith("/usr/"):
            continue
        if not any(d.startswith(k + "/") for k in out):
            out.append(d)
    return out


@functools.lru_cache(maxsize=None)
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
    binds = _python_dirs(python)
    made = {"/", "/usr", "/tmp", *_ROOT_LINKS}
    for d in binds:
        # Parents of a bind are made 0755: bwrap would make them 0700, unreadable after the uid drop.
        parts = Path(d).parts
        for i in range(2, len(parts)):
            parent = str(Path(*parts[:i]))
            if parent not in made:
                made.add(parent)
                argv += ["--perms", "0755", "--dir", parent]
        argv += ["--ro-bind", d, d]
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
            argv = _bwrap_argv(bwrap, python, os.geteuid() == 0) + [python, "-I", "-B", "-c", "pass"]
            try:
                proc = subprocess.run(argv, capture_output=True, text=True, timeout=60,
                                      env=_environment("/tmp"), stdin=subprocess.DEVNULL)
                lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
                problem = None if proc.returncode == 0 else (
                    "bubblewrap cannot start a sandbox here: "
                    + (lines[-1] if lines else f"exit status {proc.returncode}"))
            except (OSError, subprocess.TimeoutExpired) as exc:
                problem = f"bubblewrap cannot start a sandbox here: {exc}"
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
        cfg: dict[str, Any] = {"rfd": req_r, "wfd": rep_w, "guard": "",
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
            argv += [python, "-I", "-S", "-B", "-c", _RUNNER, json.dumps(cfg)]
            env, cwd, preexec, pass_fds = _environment("/tmp"), None, None, (req_r, rep_w, info_w)
        else:
            workdir = Path(tempfile.mkdtemp(prefix="renio-sandbox-")).resolve()
            cfg["uid"] = -1
            # No fork guard from the kernel for root; the audit hook refuses processes.
            cfg["limits"] = _limits(memory_mb, cpu_s, file_size_mb, 0 if as_root else max_processes)
            cfg["guard"] = _GUARD
            argv = [python, "-I", "-S", "-B", "-c", _RUNNER, json.dumps(cfg)]
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
