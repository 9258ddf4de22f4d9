"""What runs in the candidate's process: ``runner.py`` (started by path), ``wire.py`` (the
plain-data format, which the grader imports too) and ``guard.py`` (the in-process guard).

bubblewrap's sandbox shows this folder read-only as ``/sandbox`` and nothing else of renio, so
these modules import only the standard library and each other (as top-level modules).
"""
