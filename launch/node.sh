#!/usr/bin/env bash
# Start this node's share of a multi-node job without ssh: run it once on every node.
#
#   NNODES=N NODE_RANK=R MASTER_ADDR=HOST launch/node.sh CONFIG [key.path=value ...]
#
# NNODES / NODE_RANK default to SLURM_JOB_NUM_NODES / SLURM_NODEID inside a SLURM step. MASTER_ADDR:
# node 0's address (required). MASTER_PORT: default 29500, the same on every node. NPROC_PER_NODE:
# default all visible GPUs, 1 on CPU; the same on every node. PYTHON as in launch/train.sh. The
# config is checked for NNODES x NPROC_PER_NODE processes before anything starts; signals as in
# launch/train.sh. See docs/launch.md.
set -euo pipefail
# shellcheck source=launch/lib.sh
source "$(dirname -- "${BASH_SOURCE[0]}")/lib.sh"

help_if_asked "$@"
(($# >= 1)) || usage
config=$1
shift
resolve_python

nnodes=${NNODES:-${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-}}}
node_rank=${NODE_RANK:-${SLURM_NODEID:-}}
master_addr=${MASTER_ADDR:-}
master_port=${MASTER_PORT:-29500}
[[ -n $nnodes ]] || die 2 "NNODES is not set (number of nodes in the job)"
[[ -n $node_rank ]] || die 2 "NODE_RANK is not set (this node's index, 0 .. NNODES-1)"
[[ -n $master_addr ]] || die 2 "MASTER_ADDR is not set (address of node 0, reachable from every node)"
require_uint "$nnodes" 1 "" "NNODES=$nnodes: expected a positive integer"
nnodes=$((10#$nnodes))
require_uint "$node_rank" 0 $((nnodes - 1)) "NODE_RANK=$node_rank: expected 0 .. $((nnodes - 1))"
node_rank=$((10#$node_rank))
require_uint "$master_port" 1 65535 "MASTER_PORT=$master_port: not a port"

detect_devices
if [[ $DEVICE_KIND == cuda ]]; then
    nproc=${NPROC_PER_NODE:-$DEVICE_COUNT}
    require_uint "$nproc" 1 "$DEVICE_COUNT" "NPROC_PER_NODE=$nproc: this node has $DEVICE_COUNT visible GPUs"
    nproc=$((10#$nproc))
    if [[ -n ${CUDA_VISIBLE_DEVICES:-} ]]; then
        visible_device_ids "$nproc"
    else
        ids=()
        for ((i = 0; i < nproc; i++)); do ids+=("$i"); done
    fi
else
    nproc=${NPROC_PER_NODE:-1}
    require_uint "$nproc" 1 "" "NPROC_PER_NODE=$nproc: expected a positive number of processes"
    nproc=$((10#$nproc))
    ids=()
    for ((i = 0; i < nproc; i++)); do ids+=("$i"); done
fi
world=$((nnodes * nproc))

setup_env
validate "$world" "$nproc" "$config" "$@"

# With --no_ssh the deepspeed runner still needs the whole job's layout (ranks of node r are
# r*nproc .. r*nproc+nproc-1, node r's launcher picks entry r): a hostfile of NNODES placeholder
# hosts, and --include naming the devices (the launcher sets CUDA_VISIBLE_DEVICES from it).
tmp=$(mktemp -d "${TMPDIR:-/tmp}/deepseek_pt_node.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
slots=0
for id in "${ids[@]}"; do
    if ((id + 1 > slots)); then slots=$((id + 1)); fi
done
include=""
joined=$(IFS=,; echo "${ids[*]}")
for ((n = 0; n < nnodes; n++)); do
    echo "node$n slots=$slots" >>"$tmp/hostfile"
    include+="${include:+@}node$n:$joined"
done

cmd=("$PYTHON" "$LAUNCH_DIR/deepspeed_runner.py" --hostfile "$tmp/hostfile" --include "$include" --no_ssh
    --node_rank "$node_rank" --master_addr "$master_addr" --master_port "$master_port"
    --module deepseek_pt.train --config "$config" "$@")
log "node $node_rank of $nnodes: $nproc processes (ranks $((node_rank * nproc))..$((node_rank * nproc + nproc - 1)) of $world), master $master_addr:$master_port"
print_cmd "${cmd[@]}"
status=0
run_supervised "${cmd[@]}" || status=$?
exit "$status"
