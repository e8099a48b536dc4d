#!/usr/bin/env bash
# Multi-GPU expert parallelism on one host (issue 6), through launch/train.sh, in three parts:
#  correctness on a reduced bench-2b (64 experts, 3 layers, dim 512), bf16, random tokens:
#   A: EP = N on N GPUs, 10 steps     B: the same stopped at 5 and resumed
#   C: EP = 1 on N GPUs               D: B's step-5 checkpoint resumed on N/2 GPUs (universal)
#  scaling: weak scaling on the full bench-2b shape, bench/gpu_bench.py on 1 .. N GPUs, EP = GPUs;
#  profile: a profile at N GPUs for the collectives' share of the step (bench/profile_summary.py).
# Usage: [PARTS=...] [SCALE_GPUS=...] [CONFIG=yaml] [SMALL=overrides] [SCALE=args] [PROFILE=args] \
#          bench/multi_gpu_check.sh N
#  PARTS: which of "correctness scaling profile" to run (default all three). A device call ends after 10 minutes and
#  each run here builds its engine anew, so at 8 GPUs split the check over calls: PARTS=correctness, then
#  PARTS=scaling (SCALE_GPUS="1 2", then "4 8", if one call cannot take all four), then PARTS=profile.
#  SCALE_GPUS: the GPU counts of the scaling runs (default 1 .. N).
#  CONFIG (default configs/bench-2b.yaml) and the overrides of each part: SMALL, the correctness runs' shape;
#  SCALE and PROFILE, gpu_bench.py's arguments for the scaling runs and the profile. tests/test_bench.py runs the
#  script on CPU processes with the smoke config, so that the multi-GPU call does not find its bugs.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
N=${1:?number of GPUs}
parts=${PARTS:-correctness scaling profile}
for part in $parts; do
  case $part in
    correctness | scaling | profile) ;;
    *) echo "PARTS: unknown part '$part' (correctness, scaling, profile)" >&2; exit 2 ;;
  esac
done
source bench/device_env.sh
out=${OUT:-/tmp}
mkdir -p "$out" || exit 1
config=${CONFIG:-configs/bench-2b.yaml}
small=${SMALL-"model.dim=512 model.inter_dim=1536 model.n_layers=3 model.attention.n_heads=8 model.attention.kv_lora_rank=128 model.moe.expert_inter_dim=256"}
scale=${SCALE-"train.grad_accum_steps=4 --warmup 4 --steps 16"}  # bench-2b: compiled blocks, coalesced reduction
profile=${PROFILE-"train.grad_accum_steps=4 --warmup 4 --steps 4"}

correctness() {
  local vocab micro_batch work common half
  read -r vocab micro_batch < <(python3 -c "from deepseek_pt.config import load_config as l; c = l('$config')
print(c.model.vocab_size, c.train.micro_batch_size)") || return 1
  work=$(mktemp -d "${TMPDIR:-/tmp}/multi_gpu.XXXXXX") || return 1  # shards and run directories, new each call
  python3 bench/random_shards.py "$work/rs" --vocab-size "$vocab" || return 1
  common="data.path=$work/rs train.max_steps=10 train.warmup_steps=2 train.eval_every=0 $small"
  run() { local name=$1 log=$2 nproc=$3; shift 3  # run directory $work/$name, log $out/$log.log
    # shellcheck disable=SC2086
    NPROC=$nproc launch/train.sh "$config" $common run.dir="$work/$name" "$@" > "$out/$log.log" 2>&1
    echo "$name exit $?"; }
  run A A "$N" parallel.expert_parallel_size="$N"
  run B B "$N" parallel.expert_parallel_size="$N" train.exit_at_step=5
  if [ -z "${QUICK:-}" ]; then  # QUICK=1: only what D needs
    run B B_resumed "$N" parallel.expert_parallel_size="$N"
    run C C "$N" parallel.expert_parallel_size=1
  fi
  half=$((N / 2)); [ "$half" -ge 1 ] || half=1
  # The same global batch on half the ranks: each takes twice the micro-batch.
  run D D "$half" parallel.expert_parallel_size="$half" train.micro_batch_size=$((micro_batch * N / half)) \
    train.resume="$work/B/checkpoints/step_00000005"
  python3 - "$work" <<'PY'
import json, sys
def metrics(r):
    try:
        return {m["step"]: m for m in map(json.loads, open(f"{sys.argv[1]}/{r}/metrics.jsonl"))}
    except OSError:
        return {}
M = {r: metrics(r) for r in "ABCD"}
print("step " + " ".join(f"{r:>10}" for r in "ABCD"))
for s in range(1, 11):
    print(f"{s:4} " + " ".join(f"{M[r][s]['loss'] if s in M[r] else float('nan'):10.5f}" for r in "ABCD"))
# Each run against A over all the steps they share, and over the first three of them: a run whose sums inside a
# step go in another order (EP moves each expert's rows between ranks) may flip one routing choice or bias-update
# sign a few steps in, and from there its loss wanders by up to ~1e-4 (8.8e-5 on one CPU, fp32), so the first
# steps are where it must match A closely.
for r in "BCD":
    common = sorted(s for s in M[r] if s in M["A"])
    for steps in (common, common[:3]) if common else ():
        gap = max(abs(M[r][s]["loss"] - M["A"][s]["loss"]) for s in steps)
        print(f"max |{r} - A| over steps {steps[0]}-{steps[-1]}: {gap:.2e}")
        norms = [(M[r][s].get("grad_norm"), M["A"][s].get("grad_norm")) for s in steps]
        if all(n and a for n, a in norms):
            print(f"max |{r} / A - 1| of the grad norm over steps {steps[0]}-{steps[-1]}: "
                  f"{max(abs(n / a - 1) for n, a in norms):.2e}")
PY
  grep -h "universal: resharded\|stopped at step" "$out"/D.log | head -2
  rm -rf "$work"
}

scaling() {
  local g
  for g in ${SCALE_GPUS:-$(seq 1 "$N")}; do
    # shellcheck disable=SC2086
    python3 -m deepspeed.launcher.runner --num_gpus "$g" --master_port $((29700 + g)) bench/gpu_bench.py --impl ours \
      --config "$config" parallel.expert_parallel_size="$g" $scale 2> "$out/scale$g.err" | grep '^{' ||
      echo "scaling at $g GPUs: no result, see scale$g.err"
  done
}

profile() {  # the all-to-all's share of the step at N GPUs: NCCL kernel time by collective, and the exposed part
  # shellcheck disable=SC2086
  python3 -m deepspeed.launcher.runner --num_gpus "$N" --master_port 29799 bench/gpu_bench.py --impl ours --profile \
    --config "$config" parallel.expert_parallel_size="$N" $profile 2> "$out/profile$N.err" | grep '^{' ||
    echo "profile at $N GPUs: no result, see profile$N.err"
  grep -A5 "^collectives" "$out/profile$N.err" | head -12
}

for part in $parts; do "$part" || exit 1; done
