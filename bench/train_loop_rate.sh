#!/usr/bin/env bash
# The training loop's own rate, wall clock: python -m deepseek_pt.train on one process, on random tokens, without
# checkpoints or evaluation. gpu_bench.py times steps queued back to back; training also updates the balancing
# biases, logs the metrics (a wait on the GPU per step) and checks for a stop after each step. The rate here comes
# from the records' `time` over steps FROM..STEPS, and is printed beside the loop's own per-step figure.
# Usage: [STEPS=80] [FROM=20] [OUT=dir] bench/train_loop_rate.sh [CONFIG [key=value ...]]
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
config=${1:-configs/bench-2b.yaml}
shift $(($# > 0 ? 1 : 0))
steps=${STEPS:-80}
from=${FROM:-20}
out=${OUT:-/tmp}
mkdir -p "$out" || exit 1
source bench/device_env.sh
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} RANK=0 LOCAL_RANK=0 WORLD_SIZE=1 MASTER_ADDR=127.0.0.1
work=$(mktemp -d "${TMPDIR:-/tmp}/loop_rate.XXXXXX") || exit 1
trap 'rm -rf "$work"' EXIT
# The config's warmup, cut to STEPS: a longer one is refused (the rate would never reach train.lr)
shape=$(python3 -c "import sys; from deepseek_pt.config import load_config
c = load_config(sys.argv[1], sys.argv[3:]); t = c.train; steps = int(sys.argv[2])
print(c.model.vocab_size, t.micro_batch_size * t.grad_accum_steps * c.data.seq_len, min(t.warmup_steps, steps))" \
  "$config" "$steps" "$@") || exit 1
read -r vocab tokens_per_step warmup <<< "$shape"
python3 bench/random_shards.py "$work/shards" --vocab-size "$vocab" --train-tokens $((tokens_per_step * (steps + 1) + 4096)) \
  --val-tokens 4096 > /dev/null || exit 1
MASTER_PORT=${MASTER_PORT:-29520} python3 -m deepseek_pt.train --config "$config" data.path="$work/shards" \
  run.dir="$work/run" train.max_steps="$steps" train.warmup_steps="$warmup" train.checkpoints=false train.eval_every=0 \
  train.save_every=0 "$@" > "$out/train_loop_rate.log" 2>&1 || { tail -n 20 "$out/train_loop_rate.log" >&2; exit 1; }
cp "$work/run/metrics.jsonl" "$out/train_loop_rate.jsonl"
# With train.profile_start_step among the overrides, the traces come back beside the log
[ ! -d "$work/run/profile" ] || cp -r "$work/run/profile" "$out/" || exit 1
python3 - "$work/run/metrics.jsonl" "$from" <<'PY'
import json
import sys

records = [json.loads(line) for line in open(sys.argv[1])]
first, last = int(sys.argv[2]), len(records)  # step numbers
if not 1 <= first < last:
    sys.exit(f"train_loop_rate.sh: FROM={first} must lie in 1..{last - 1} (STEPS={last})")
window = records[first - 1:]  # records of steps first..last
seconds = window[-1]["time"] - window[0]["time"]
tokens = window[-1]["tokens_seen"] - window[0]["tokens_seen"]
logged = [r["step_time_s"] for r in window[1:]]
print(json.dumps({"steps": f"{first}-{last}", "tokens_per_s_wall": round(tokens / seconds),
                  "ms_per_step_wall": round(1e3 * seconds / (len(window) - 1), 2),
                  "ms_per_step_logged": round(1e3 * sum(logged) / len(logged), 2),
                  "peak_mem_gib": round(window[-1]["peak_mem_gib"], 2), "loss": round(window[-1]["loss"], 4)}))
PY
