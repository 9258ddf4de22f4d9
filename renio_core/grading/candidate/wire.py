"""Plain data between the code grader and the candidate's process (arXiv 2606.23104 grades
code by running it; see ``sandbox.py`` for why the tests never run in the candidate's process).

One message is a 4-byte big-endian length, then that many bytes of ASCII JSON. Values inside
a message are tagged JSON: None, bool, int, float and str stand for themselves; a list
``[tag, ...]`` is a list (``L``), tuple (``T``), set (``S``), frozenset (``F``) or dict
(``D``, keys and values alternating) of tagged items, bytes (``["B", hex]``) or a complex
number (``["C", real, imag]``). Nothing else can be written, so an object of the candidate's
own (a rigged ``__eq__``) cannot reach the grader; :func:`decode` builds genuine built-in
objects only and rejects anything else.

Both sides import this module: the grader as ``renio_core.grading.candidate.wire``, the
candidate's runner (``runner.py``) as its neighbour inside the sandbox, where no renio package
exists. So it imports nothing but the standard library, and only what the candidate's side
imports anyway (its start is part of every graded program's time).
"""

import json

MAX_DEPTH = 100  # nesting of one value

_CONTAINER_TAGS = {list: "L", tuple: "T", set: "S", frozenset: "F"}
_BUILDERS = {"L": list, "T": tuple, "S": set, "F": frozenset}
# Subclasses (a Counter, a namedtuple, an IntEnum) travel as their plain base type.
_PLAIN_BASES = (bool, int, float, str, complex, bytes, tuple, list, dict, frozenset, set)


def encode(x: object, depth: int = 0) -> object:
    """A plain value -> tagged JSON; TypeError for anything that is not plain data.

    NumPy arrays and scalars become their ``tolist()`` value; subclasses of the plain types
    become the plain type."""
    if depth > MAX_DEPTH:
        raise TypeError("a value nested too deeply is not plain data")
    t = type(x)
    if x is None or t is bool or t is int or t is float or t is str:
        return x
    tag = _CONTAINER_TAGS.get(t)
    if tag is not None:
        return [tag] + [encode(v, depth + 1) for v in x]
    if t is dict:
        out: list = ["D"]
        for k, v in x.items():
            out += [encode(k, depth + 1), encode(v, depth + 1)]
        return out
    if t is bytes:
        return ["B", x.hex()]
    if t is complex:
        return ["C", x.real, x.imag]
    if t.__module__ == "numpy" and hasattr(x, "tolist"):
        return encode(x.tolist(), depth)
    for base in _PLAIN_BASES:
        if isinstance(x, base):
            return encode(base(x), depth)
    raise TypeError(f"a {t.__name__} is not plain data")


def decode(v: object, depth: int = 0) -> object:
    """Tagged JSON -> genuine built-in objects; ValueError for anything else (TypeError where
    a dict key or set item is unhashable)."""
    if depth > MAX_DEPTH:
        raise ValueError("nested too deeply")
    t = type(v)
    if v is None or t is bool or t is int or t is float or t is str:
        return v
    if t is not list or not v or type(v[0]) is not str:
        raise ValueError("not plain data")
    tag, items = v[0], v[1:]
    if tag == "B" and len(items) == 1 and type(items[0]) is str:
        return bytes.fromhex(items[0])
    if tag == "C" and len(items) == 2 and all(type(i) in (int, float) for i in items):
        return complex(items[0], items[1])
    values = [decode(i, depth + 1) for i in items]
    build = _BUILDERS.get(tag)
    if build is not None:
        return build(values)
    if tag == "D" and len(values) % 2 == 0:
        return dict(zip(values[0::2], values[1::2], strict=True))
    raise ValueError("not plain data")


def frame(message: object) -> bytes:
    """One message as it crosses the pipe: length, then JSON."""
    data = json.dumps(message).encode("ascii")
    return len(data).to_bytes(4, "big") + data
