"""The candidate's side of the code grader: the process that runs the generated program.

Started by ``sandbox.run_tests`` as ``python -I -S -B runner.py CONFIG_JSON``: under
bubblewrap as ``/sandbox/runner.py`` (this folder, shown read-only; the sandbox holds no renio
package, so this imports only the standard library and its neighbours), or, for the
in-process guard, from its place in the package. It sets its limits (and drops to a uid of
its own when started as root), reads the program, runs it, reports the names of its
callables, then answers calls until the grader closes the pipe. Nothing it sends is trusted:
the grader decodes plain data only (arXiv 2606.23104 grades code by running it; this side
decides nothing).

``CONFIG_JSON`` holds ``rfd``/``wfd`` (the request and reply pipes), ``path`` (site-packages
directories, added without running their ``.pth`` files: ``-S`` starts faster), ``limits``
(resource name -> value), ``uid`` (-1: keep) and ``guard`` (true: install the in-process
audit hook of ``guard.py`` before the program runs).
"""

import json
import os
import resource
import sys

# -I leaves this file's folder off sys.path; the wire format is the grader's own module.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import wire  # noqa: E402

del sys.path[0]


def _read_exact(fd, n):
    chunks = []
    while n:
        chunk = os.read(fd, min(n, 1 << 20))
        if not chunk:
            os._exit(0)  # the grader is done
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def _receive(fd):
    return json.loads(_read_exact(fd, int.from_bytes(_read_exact(fd, 4), "big")))


def _send(fd, message):
    data = wire.frame(message)
    while data:
        data = data[os.write(fd, data):]


def _confine(cfg):
    for which, value in cfg["limits"].items():
        try:
            resource.setrlimit(getattr(resource, which), (value, value))
        except (ValueError, OSError):
            pass  # a hard limit already lower than ours stays as it is
    if cfg["uid"] >= 0:
        os.setgroups([])
        os.setresgid(cfg["uid"], cfg["uid"], cfg["uid"])
        os.setresuid(cfg["uid"], cfg["uid"], cfg["uid"])
    if cfg["guard"]:
        # Imported only where used: bubblewrap's sandbox has no bytecode of it to load.
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import guard

        del sys.path[0]
        guard.install(os.getcwd())


def _answer(namespace, message):
    try:
        fn = namespace[message["call"]]
        result = fn(*wire.decode(message["args"]), **wire.decode(message["kwargs"]))
        reply = {"value": wire.encode(result)}
    except BaseException as exc:
        try:
            text = str(exc)[:500]
        except BaseException:
            text = ""
        reply = {"raised": type(exc).__name__, "message": text}
    return reply


def main():
    cfg = json.loads(sys.argv[1])
    sys.path.extend(cfg["path"])
    rfd, wfd = cfg["rfd"], cfg["wfd"]
    _confine(cfg)
    program = _receive(rfd)["program"]
    namespace = {"__name__": "solution", "__builtins__": __builtins__}
    try:
        exec(compile(program, "solution.py", "exec"), namespace)
    except BaseException as exc:
        import traceback

        traceback.print_exc()
        sys.stderr.flush()
        _send(wfd, {"loaded": False, "error": type(exc).__name__})
        os._exit(3)
    names = [k for k, v in list(namespace.items())
             if type(k) is str and not k.startswith("__") and callable(v)]
    sys.stdout.flush()
    _send(wfd, {"loaded": True, "names": names})
    while True:
        reply = _answer(namespace, _receive(rfd))
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except BaseException:
            pass
        try:
            _send(wfd, reply)
        except (TypeError, ValueError, RecursionError):
            _send(wfd, {"raised": "TypeError", "message": "the result is not plain data"})


if __name__ == "__main__":
    main()
