#!/usr/bin/env bash
# Train on this node: every visible GPU, or NPROC processes on CPU (gloo).
#
#   launch/train.sh CONFIG [key.path=value ...]
#
# Environment: NPROC (processes; default: all visible GPUs, 2 on CPU), MASTER_PORT (default: a free
# port), PYTHON (default: $VIRTUAL_ENV/bin/python, else python3). The config is checked for the
# planned world size before any process starts. SIGTERM/SIGINT/SIGUSR1/SIGHUP: the ranks checkpoint at
# the end of the step and the script exits 0. See docs/launch.md.
set -euo pipefail
# shellcheck source=launch/lib.sh
source "$(dirname -- "${BASH_SOURCE[0]}")/lib.sh"

help_if_asked "$@"
(($# >= 1)) || usage
config=$1
shift
resolve_python
detect_devices

select=()
if [[ $DEVICE_KIND == cuda ]]; then
    nproc=${NPROC:-$DEVICE_COUNT}
    require_uint "$nproc" 1 "$DEVICE_COUNT" "NPROC=$nproc: this node has $DEVICE_COUNT visible GPUs"
    nproc=$((10#$nproc))
    if [[ -n ${CUDA_VISIBLE_DEVICES:-} ]]; then
        # The launcher would drop CUDA_VISIBLE_DEVICES with --num_gpus: name the devices instead.
        visible_device_ids "$nproc"
        select=(--include "localhost:$(IFS=,; echo "${ids[*]}")")
    else
        select=(--num_gpus "$nproc")
    fi
else
    nproc=${NPROC:-2}
    require_uint "$nproc" 1 "" "NPROC=$nproc: expected a positive number of processes"
    nproc=$((10#$nproc))
    select=(--num_gpus "$nproc")  # on CPU the launcher starts this many processes
fi

[[ -z ${MASTER_PORT:-} ]] || require_uint "$MASTER_PORT" 1 65535 "MASTER_PORT=$MASTER_PORT: not a port"

setup_env
validate "$nproc" "$nproc" "$config" "$@"
port=${MASTER_PORT:-$("$PYTHON" "$LAUNCH_DIR/plan.py" free-port)}

# No hostfile: a stray /job/hostfile must not turn this into a pdsh multi-node launch.
cmd=("$PYTHON" "$LAUNCH_DIR/deepspeed_runner.py" --hostfile /dev/null "${select[@]}" --master_port "$port"
    --module deepseek_pt.train --config "$config" "$@")
print_cmd "${cmd[@]}"
status=0
run_supervised "${cmd[@]}" || status=$?
exit "$status"
