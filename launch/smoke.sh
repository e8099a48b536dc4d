#!/usr/bin/env bash
# The first job to run on a new machine (1-2 minutes on 2 CPU cores): CPython's pydoc topics ->
# sentencepiece tokenizer -> token shards, then configs/smoke.yaml trained by 2 processes with
# ZeRO-3 and expert parallelism 2, stopped half-way (train.exit_at_step) and resumed from that
# checkpoint to the end, then evaluated on the val split.
#
#   launch/smoke.sh [key.path=value ...]      (overrides go to both training runs)
#
# Environment: SMOKE_DIR (default runs/smoke in the repository): the shards go to SMOKE_DIR/data and
# are reused while they verify; the training run in SMOKE_DIR starts from scratch every time (its
# checkpoints/, metrics.jsonl, config.yaml and wandb/ are removed; other files there are left alone;
# a SMOKE_DIR that a training run still holds is refused).
# NPROC (default 2; must be a multiple of 2 for EP=2), PYTHON as in launch/train.sh.
set -euo pipefail
# shellcheck source=launch/lib.sh
source "$(dirname -- "${BASH_SOURCE[0]}")/lib.sh"

help_if_asked "$@"
for arg in "$@"; do
    [[ $arg == *=* ]] || usage
done
resolve_python
export PYTHON
smoke_dir=${SMOKE_DIR:-$REPO_ROOT/runs/smoke}
mkdir -p "$smoke_dir"
smoke_dir=$(cd -- "$smoke_dir" && pwd)
# A smoke job still training here (deepseek_pt.train holds run.dir/.lock) would lose its shards and checkpoints.
if [[ -e $smoke_dir/.lock ]] && command -v flock >/dev/null && ! flock -n "$smoke_dir/.lock" true; then
    die 2 "$smoke_dir is in use by a training run ($(<"$smoke_dir/.lock")): wait for it to end, or set SMOKE_DIR"
fi
data=$smoke_dir/data
prep=$smoke_dir/prep
config=$REPO_ROOT/configs/smoke.yaml
vocab=$("$PYTHON" "$LAUNCH_DIR/plan.py" value model.vocab_size "$config" "$@")
[[ -n $vocab ]] || {
    PYTHONPATH=$REPO_ROOT "$PYTHON" -m deepseek_pt.train --check-only --config "$config" "$@" data.path=/ >/dev/null || true
    die 2 "bad overrides: $*"
}
started=$SECONDS
step() { printf '\n[smoke] == %s (%ss)\n' "$*" "$((SECONDS - started))" >&2; }

# 1. Data: reuse verified shards, else build them from scratch.
step "data: $data"
if [[ -f $data/manifest.json ]] && "$PYTHON" "$REPO_ROOT/data_prep/verify_shards.py" --quiet "$data" >&2; then
    log "shards verified: reusing them"
else
    [[ ! -e $data ]] || log "shards missing or failing verification: rebuilding"
    rm -rf "$data" "$prep"
    "$PYTHON" "$REPO_ROOT/data_prep/pydoc_corpus.py" --out "$prep/pydoc.jsonl"
    "$PYTHON" "$REPO_ROOT/data_prep/train_tokenizer.py" --input "$prep/pydoc.jsonl" --vocab-size "$vocab" \
        --out "$prep/tokenizer" --num-threads 2 --quiet
    "$PYTHON" "$REPO_ROOT/data_prep/build_shards.py" --input "$prep/pydoc.jsonl" \
        --tokenizer "$prep/tokenizer/tokenizer.model" --out "$data" --shard-tokens 16384 --val-fraction 0.1 \
        --num-proc 2 --quiet
    "$PYTHON" "$REPO_ROOT/data_prep/verify_shards.py" --quiet "$data" >&2
fi

# 2. Training, from scratch: the previous smoke run's outputs go (the data stays), and nothing else: SMOKE_DIR may
# name a directory holding other files (everything in it but data/ and prep/ was deleted).
rm -rf "$smoke_dir/checkpoints" "$smoke_dir/metrics.jsonl" "$smoke_dir/config.yaml" "$smoke_dir/wandb"
overrides=(data.path="$data" run.dir="$smoke_dir" "$@")
max_steps=$("$PYTHON" "$LAUNCH_DIR/plan.py" value train.max_steps "$config" "${overrides[@]}")
half=$((max_steps / 2 > 0 ? max_steps / 2 : 1))
export NPROC=${NPROC:-2}

step "train steps 1..$half on $NPROC processes, then stop (train.exit_at_step=$half)"
"$LAUNCH_DIR/train.sh" "$config" "${overrides[@]}" train.exit_at_step="$half"
latest=$(<"$smoke_dir/checkpoints/latest")
[[ $latest == "$(printf 'step_%08d' "$half")" ]] || die 1 "expected a checkpoint at step $half, latest is $latest"

step "resume from $latest to step $max_steps (train.resume=auto)"
"$LAUNCH_DIR/train.sh" "$config" "${overrides[@]}"

step "evaluate the final checkpoint on the val split"
PYTHONPATH=$REPO_ROOT "$PYTHON" -m deepseek_pt.evaluate --checkpoint "$smoke_dir" --data "$data" --split val

step "done"
"$PYTHON" - "$smoke_dir/metrics.jsonl" "$half" <<'EOF'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
by_step = {r["step"]: r for r in rows}
first, mid, last = by_step[1], by_step[int(sys.argv[2])], rows[-1]
print(f"[smoke] loss: step 1 {first['loss']:.3f} -> step {mid['step']} {mid['loss']:.3f} -> step {last['step']} {last['loss']:.3f}")
evals = [f"step {r['step']} {r['eval_loss']:.3f}" for r in rows if r.get("eval_loss") is not None]
if evals:
    print("[smoke] eval_loss: " + ", ".join(evals))
if not last["loss"] < first["loss"]:
    sys.exit("[smoke] error: the loss did not fall")
EOF
cat <<EOF
[smoke] metrics:     $smoke_dir/metrics.jsonl (one JSON line per step)
[smoke] checkpoints: $smoke_dir/checkpoints (latest: $(<"$smoke_dir/checkpoints/latest"))
[smoke] config:      $smoke_dir/config.yaml
[smoke] data:        $data (tokenizer: $data/tokenizer.model)
[smoke] finished in $((SECONDS - started)) s
EOF
