#!/usr/bin/env bash
# FP8 against bf16 on real text, on one GPU: the training loop (python -m deepseek_pt.train) on the same model,
# data and seed in bf16, torchao rowwise and tensorwise FP8, or the other RUNS below; each run's metrics.jsonl
# goes to $OUT (or /tmp), then bench/loss_table.py's table of mean train losses per window of steps and over the
# second half, each run against its seed's bf16.
# Usage: [RUNS=...] [PARALLEL=1] [RUN_TIMEOUT=seconds] [CONFIG=yaml] [MASTER_PORT=first port - 1] \
#          bench/fp8_loss_check.sh SHARDS_DIR [STEPS [key=value ...]]
# SHARDS_DIR: vocabulary <= 8192 unless CONFIG is set, e.g. the pydoc corpus (data_prep/pydoc_corpus.py
# [--stdlib-docstrings], train_tokenizer.py --vocab-size 8192, build_shards.py; docs/benchmarks.md). Held-out
# losses too with train.eval_every=N (shards with a validation split).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
shards=${1:?usage: bench/fp8_loss_check.sh SHARDS_DIR [STEPS]}
steps=${2:-300}
shift $(($# > 1 ? 2 : 1))  # the rest: key=value overrides for every run
out=${OUT:-/tmp}
mkdir -p "$out" || exit 1
source bench/device_env.sh
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} RANK=0 LOCAL_RANK=0 WORLD_SIZE=1 MASTER_ADDR=127.0.0.1
# The model: CONFIG as it is, or by default bench-2b's layout at a quarter of its width (156M parameters, 70M
# active): every FP8 linear keeps dims that are multiples of 16, and 300 steps take seconds.
config=${CONFIG:-configs/bench-2b.yaml}
model=()
[ -n "${CONFIG:-}" ] || model=(model.vocab_size=8192 model.dim=1024 model.inter_dim=2816 model.attention.n_heads=8
  model.attention.kv_lora_rank=256 model.moe.n_routed_experts=16 model.moe.top_k=4 model.moe.expert_inter_dim=704)
# No checkpoints: nothing resumes these runs, and three exit checkpoints of bench-v3-dense (22 GB each) overfilled a
# device machine's 64 GiB disk. Compiled kernels chosen without timing them (train.compile_deterministic): timed
# choices depend on what else the GPU runs meanwhile, and moved one bf16 curve by 1.8% between two calls; with it
# a run alone and one beside another matched to the bit (docs/benchmarks.md). A warmup of 30 steps, or the whole of a
# shorter run (a longer warmup is refused).
train=(data.path="$shards" data.seq_len=512 train.micro_batch_size=8 train.max_steps="$steps"
       train.warmup_steps=$((steps < 30 ? steps : 30))
       train.eval_every=0 train.save_every=0 train.checkpoints=false train.compile_deterministic=true)
port=${MASTER_PORT:-29510}
# The runs' directories, new for each call of this script: a run killed before its cleanup
# must not leave a metrics.jsonl that the next call's run of that name would append to.
work=$(mktemp -d "${TMPDIR:-/tmp}/fp8_loss.XXXXXX") || exit 1
# RUNS: bf16, bf16_repeat, bf16_eager, bf16_pointwise, fp32 or
# fp8_RECIPE[_experts[_shared]][_attn][_dense][_wgrad|_wgradrow][_fast] (below), each with an optional _seedN: the same
# run from another initialization (train.seed=N). A run is compared against the bf16 run of its seed when RUNS has one
# (fp8_tensorwise_seed1 against bf16_seed1), else against bf16 (bf16_seed1 against bf16: how far a new initialization
# alone moves the curve).
runs=${RUNS:-bf16 fp8_rowwise fp8_tensorwise}
run_one() {  # name port settings...: one training run, its log and metrics to $out
  local name=$1 port=$2 dir=$work/$1 pid
  shift 2
  MASTER_PORT=$port timeout "${RUN_TIMEOUT:-300}" python3 -m deepseek_pt.train --config "$config" "${model[@]}" \
    "${train[@]}" run.dir="$dir" "$@" "${overrides[@]}" > "$out/train_$name.log" 2>&1 &
  pid=$!
  # Copy the curve while it grows: a device call's limit can stop this script before the run ends.
  while kill -0 "$pid" 2> /dev/null; do cp "$dir/metrics.jsonl" "$out/metrics_$name.jsonl" 2> /dev/null; sleep 5; done
  wait "$pid" || { echo "FAILED: $name" >&2; tail -n 20 "$out/train_$name.log" >&2; }
  cp "$dir/metrics.jsonl" "$out/metrics_$name.jsonl" 2> /dev/null
  rm -rf "$dir"
}
overrides=("$@")
for name in $runs; do
  kind=${name%_seed*} seed=()
  [[ $name == "$kind" ]] || seed=(train.seed="${name##*_seed}")
  case $kind in
    bf16 | bf16_repeat) settings=(precision=bf16) ;;  # a repeat shows the GPU's run-to-run spread
    # The same bf16 model and data through other kernels (nothing compiled): how far a change of rounding
    # alone moves the curve, the yardstick for FP8's gap that a new seed (a new initialization) is not.
    bf16_eager) settings=(precision=bf16 train.compile=false train.compile_blocks=false) ;;
    bf16_pointwise) settings=(precision=bf16 train.compile=true train.compile_blocks=false) ;;  # a smaller change of kernels
    fp32) settings=(precision=fp32) ;;  # the reference both bf16 and FP8 round away from
    # fp8_RECIPE[_experts[_shared]][_attn][_dense][_wgrad|_wgradrow][_fast]: every eligible linear in RECIPE
    # (layers=all: the numerics of all, not only of the wide ones); _experts: the routed experts' grouped GEMMs in FP8
    # too; _shared: the shared experts' as well (fp8.shared_experts); _attn: the attention projections through
    # fp8.attention; _dense: the dense MLPs through fp8.dense_mlp; _wgrad: those two's weight gradients in FP8
    # (fp8.linear_weight_grads=fp8), _wgradrow with a scale per channel (fp8_rowwise); _fast: fp8.fast_accum=all.
    fp8_*) recipe=${kind#fp8_} settings=(precision=fp8 fp8.layers=all)
      [[ $recipe != *_fast ]] || { recipe=${recipe%_fast}; settings+=(fp8.fast_accum=all); }
      [[ $recipe != *_wgrad ]] || { recipe=${recipe%_wgrad}; settings+=(fp8.linear_weight_grads=fp8); }
      [[ $recipe != *_wgradrow ]] || { recipe=${recipe%_wgradrow}
                                       settings+=(fp8.linear_weight_grads=fp8_rowwise); }
      [[ $recipe != *_dense ]] || { recipe=${recipe%_dense}; settings+=(fp8.dense_mlp=true); }
      [[ $recipe != *_attn ]] || { recipe=${recipe%_attn}; settings+=(fp8.attention=true); }
      [[ $recipe != *_experts_shared ]] || { recipe=${recipe%_shared}; settings+=(fp8.shared_experts=true); }
      [[ $recipe != *_experts ]] || { recipe=${recipe%_experts}; settings+=(fp8.experts=true); }
      settings+=(fp8.recipe="$recipe") ;;
    *) echo "unknown run $name" >&2; exit 2 ;;
  esac
  settings+=("${seed[@]}")
  port=$((port + 1))
  echo "$name: ${settings[*]}"
  # PARALLEL=1: all runs at once on the one GPU, so that runs compared with each other share a machine and a
  # call; their tokens/s then mean nothing. Each needs its own memory: three bf16 or FP8 runs of the 2.2B
  # bench-v3-dense fit an H200 (40 GiB each), an fp32 run (48 GiB) beside two others did not; on an H100 a bf16
  # and an FP8 run of it together did not (36 + 37 GiB, and the FP8 one's next 0.8).
  if [ "${PARALLEL:-0}" = 1 ]; then run_one "$name" "$port" "${settings[@]}" & else run_one "$name" "$port" "${settings[@]}"; fi
done
wait
rmdir "$work"
files=()
for name in $runs; do files+=("$out/metrics_$name.jsonl"); done
python3 bench/loss_table.py --steps "$steps" "${files[@]}"
