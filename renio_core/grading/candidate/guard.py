"""The weaker guard of ``--unsafe-inprocess-sandbox``: a PEP 578 audit hook that the candidate's
runner (``runner.py``) installs in its own process before the generated program runs.

It refuses writes outside the work directory, new processes, signals, sockets, links and
ctypes. Code written to escape can undo it (it lives in the process it guards), which is why
renio uses bubblewrap wherever it can and records which isolation graded each program. Runs
in the candidate's process, so it imports only the standard library.
"""

import os
import sys

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
_BLOCKED_IMPORTS = {"_posixsubprocess", "_ctypes"}


def _no_fork_exec(*args, **kwargs):
    raise PermissionError("sandbox: creating processes is not allowed")


def install(root):
    """Guard this process: from now on, writes are allowed only under ``root``."""
    root = os.path.realpath(root)

    def inside(path):
        if isinstance(path, int):
            return True
        if isinstance(path, bytes):
            path = os.fsdecode(path)
        full = os.path.realpath(os.path.join(os.getcwd(), os.fspath(path)))
        return full in _ALLOWED_OUTSIDE or full == root or full.startswith(root + os.sep)

    def hook(event, args):
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
            if writing and not inside(path):
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
                if i < len(args) and args[i] is not None and not inside(args[i]):
                    raise PermissionError(f"sandbox: {event} outside the sandbox is not allowed")

    # Disarm the C function that forks: subprocess finds this patched module in sys.modules,
    # and the hook refuses any fresh import of it.
    import _posixsubprocess

    _posixsubprocess.fork_exec = _no_fork_exec
    sys.addaudithook(hook)
