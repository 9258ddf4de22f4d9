# Settings shared by every script in examples/slurm/. EDIT THIS FILE (or export the same
# variables before running submit.sh / iterate.sh: what is already set in the environment wins).
#
#   WORK           a directory on a file system every node sees; each stage writes under it
#   STUDENT        the student model (a Hugging Face name or path), e.g. Qwen/Qwen3-1.7B
#   TEACHER        the teacher model, or "self" for OPSD (the student shown the solution)
#   PROMPTS        the training prompts file; EVAL_BENCH the held-out benchmark for `renio eval`
#   SHARDS         array tasks for rollout and score (one GPU each)
#   TRAIN_GPUS     GPUs for train (torchrun processes on one node)
#   RENIO          the command that runs renio (e.g. "renio", or "python -m renio_cli.main")
#   *_ARGS         extra flags for each stage (see `renio STAGE --help`)
#   (An empty value, e.g. GPU_ARGS= on a CPU cluster, is kept; unset ones get the defaults.)
#   SBATCH_ARGS    flags added to every sbatch call: partition, account, time, GPUs ...
#                  e.g. "--partition=gpu --account=myproj --time=04:00:00"
#   GPU_ARGS       how one task asks for a GPU on your cluster, e.g. "--gres=gpu:1"
#                  (leave empty on a CPU-only cluster)
: "${WORK:=$PWD/renio-work}"
: "${STUDENT:=Qwen/Qwen3-1.7B}"
: "${TEACHER:=Qwen/Qwen3-8B}"
: "${PROMPTS:=prompts.jsonl}"
: "${EVAL_BENCH:=math500}"
: "${SHARDS:=4}"
: "${TRAIN_GPUS:=1}"
: "${RENIO:=renio}"
: "${ROLLOUT_ARGS=--n 8 --max-new-tokens 4096 --dtype bfloat16}"
: "${SCORE_ARGS=--dtype bfloat16}"
: "${WEIGHT_ARGS=--clip 2.0 --threshold 1.0}"
: "${TRAIN_ARGS=--lr 1e-5 --lora-r 64 --lora-alpha 128 --save-every 50}"
: "${EVAL_ARGS=--n 4 --max-new-tokens 4096}"
: "${SBATCH_ARGS=}"
: "${GPU_ARGS=--gres=gpu:1}"
# Iteration loop (iterate.sh): how many iterations.
: "${ITERATIONS:=4}"
export WORK STUDENT TEACHER PROMPTS EVAL_BENCH SHARDS TRAIN_GPUS RENIO ROLLOUT_ARGS SCORE_ARGS \
  WEIGHT_ARGS TRAIN_ARGS EVAL_ARGS SBATCH_ARGS GPU_ARGS ITERATIONS
