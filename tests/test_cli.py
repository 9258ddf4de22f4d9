"""The ``renio`` command line as a whole: the command list, and options that agree with the
stages' config dataclasses."""

from __future__ import annotations

import os
import re
import subprocess
import sys


def test_help_lists_commands_in_pipeline_order() -> None:
    out = subprocess.run([sys.executable, "-m", "renio_cli.main", "--help"], capture_output=True,
                         text=True, check=True, env={**os.environ, "COLUMNS": "120"}).stdout
    listed = re.findall(r"^│ (\w+)\s{2,}", out, flags=re.M)
    assert listed == ["toy", "rollout", "score", "weight", "train", "eval", "inspect", "run"]
