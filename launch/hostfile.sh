#!/usr/bin/env bash
# Train on the hosts of an MPI-style hostfile ("worker-0 slots=8" per line), started from one of
# them over passwordless ssh + pdsh (the deepspeed launcher's default multi-node mode).
#
#   launch/hostfile.sh HOSTFILE CONFIG [key.path=value ...]
#
# Environment: MASTER_ADDR (default: the first host's `hostname -I`, found over ssh; 127.0.0.1 for
# a one-host file), MASTER_PORT (default 29500), NNODES (use the first N hosts), NPROC_PER_NODE
# (processes per host; default: its slots), PYTHON as in launch/train.sh (the same path must exist
# on every host, as must the repository and CONFIG). Checked for the whole world size before
# anything starts; signals as in launch/train.sh. See docs/launch.md.
set -euo pipefail
# shellcheck source=launch/lib.sh
source "$(dirname -- "${BASH_SOURCE[0]}")/lib.sh"

help_if_asked "$@"
(($# >= 2)) || usage
hostfile=$1
config=$2
shift 2
resolve_python
[[ -f $hostfile ]] || die 2 "$hostfile: hostfile not found"

# Parsed like deepspeed's runner: "HOST slots=N" lines, blank lines and '#' comments skipped; stricter
# on N, which must be a whole positive word (the runner takes "slots=2x" for 2, and a 0-slot host).
hosts=()
slots=()
lineno=0
while IFS= read -r line || [[ -n $line ]]; do
    lineno=$((lineno + 1))
    line=${line#"${line%%[![:space:]]*}"}
    [[ -z $line || $line == \#* ]] && continue
    [[ $line =~ ^([^[:space:]]+)[[:space:]]+slots=0*([1-9][0-9]{0,8})([[:space:]]|$) ]] ||
        die 2 "$hostfile:$lineno: expected 'HOST slots=N', got '$line'"
    for h in "${hosts[@]}"; do
        [[ $h != "${BASH_REMATCH[1]}" ]] || die 2 "$hostfile:$lineno: host ${BASH_REMATCH[1]} listed twice"
    done
    hosts+=("${BASH_REMATCH[1]}")
    slots+=("${BASH_REMATCH[2]}")
done <"$hostfile"
((${#hosts[@]} > 0)) || die 2 "$hostfile: no 'HOST slots=N' entries"

select=()
if [[ -n ${NNODES:-} ]]; then
    require_uint "$NNODES" 1 "${#hosts[@]}" "NNODES=$NNODES: $hostfile lists ${#hosts[@]} hosts"
    NNODES=$((10#$NNODES))
    hosts=("${hosts[@]:0:NNODES}")
    slots=("${slots[@]:0:NNODES}")
    select+=(--num_nodes "$NNODES")
fi
if [[ -n ${NPROC_PER_NODE:-} ]]; then
    require_uint "$NPROC_PER_NODE" 1 "" "NPROC_PER_NODE=$NPROC_PER_NODE: expected a positive integer"
    NPROC_PER_NODE=$((10#$NPROC_PER_NODE))
    # --num_gpus K starts K processes on every host, whatever its slots (GPUs) say.
    for i in "${!slots[@]}"; do
        ((NPROC_PER_NODE <= slots[i])) ||
            die 2 "NPROC_PER_NODE=$NPROC_PER_NODE: more than the ${slots[i]} slots of ${hosts[i]} in $hostfile"
        slots[i]=$NPROC_PER_NODE
    done
    select+=(--num_gpus "$NPROC_PER_NODE")
fi
world=0 per_node=0
for s in "${slots[@]}"; do world=$((world + s)); ((s <= per_node)) || per_node=$s; done
((world > 0)) || die 2 "$hostfile: no slots"

if ((${#hosts[@]} > 1)); then
    command -v pdsh >/dev/null || die 2 "pdsh is not installed: the deepspeed launcher needs it for a multi-host hostfile (or use launch/node.sh on every host)"
    # The runner's own check (passwordless ssh to the first host), made here so that its failure is one line
    # before anything starts, not the runner's traceback.
    command -v ssh >/dev/null || die 2 "ssh is not installed: the deepspeed launcher needs passwordless ssh to every host (or use launch/node.sh on every host)"
    if ! ssh_err=$(ssh -o PasswordAuthentication=no -o BatchMode=yes -o ConnectTimeout=20 "${hosts[0]}" hostname 2>&1 >/dev/null); then
        die 2 "${hosts[0]}: not reachable over passwordless ssh, which the deepspeed launcher needs for a multi-host hostfile (or use launch/node.sh on every host): ${ssh_err//$'\n'/ }"
    fi
fi

port=${MASTER_PORT:-29500}
require_uint "$port" 1 65535 "MASTER_PORT=$port: not a port"

detect_devices  # of this host; the others are assumed alike (CPU or GPU) for the env defaults
setup_env
validate "$world" "$per_node" "$config" "$@"

tmp=$(mktemp -d "${TMPDIR:-/tmp}/deepseek_pt_hostfile.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
if ((${#hosts[@]} == 1)); then
    # One host: the runner launches locally (no pdsh, no ssh needed).
    select+=(--no_ssh_check --master_addr "${MASTER_ADDR:-127.0.0.1}")
else
    [[ -z ${MASTER_ADDR:-} ]] || select+=(--master_addr "$MASTER_ADDR")
    # The runner forwards only NCCL*, PYTHON*, UCX*, MV2*, MLFLOW* variables to the other hosts, plus
    # the lines of a .deepspeed_env file: hand it ours, followed by the user's (which win).
    {
        # NCCL_NVLS_ENABLE too: the runner forwards NCCL* only when the host it starts on has a GPU
        for v in OMP_NUM_THREADS NCCL_NVLS_ENABLE TORCH_SYMM_MEM_DISABLE_MULTICAST NVSHMEM_DISABLE_NVLS TORCH_CUDA_ARCH_LIST; do
            if [[ -n ${!v:-} ]]; then echo "$v=${!v}"; fi
        done
        name=${DS_ENV_FILE:-.deepspeed_env}
        for f in "$HOME/$name" "./$name" "$name"; do
            if [[ -f $f ]]; then grep -v '^[[:space:]]*$' "$f" || true; fi
        done | awk '!seen[$0]++'
    } >"$tmp/deepspeed_env"
    export DS_ENV_FILE=$tmp/deepspeed_env
    # Stop signal: SIGTERM to the ranks (children of this job's deepspeed.launcher.launch) on every
    # host, leaving pdsh and the launchers alone so that they report the ranks' exit status.
    # shellcheck disable=SC2317  # called from the signal trap (REMOTE_STOP)
    remote_stop() {
        local pattern="^[^ ]*python[^ ]* -u -m deepspeed[.]launcher[.]launch .*--master_port=$port( |\$)"
        PDSH_RCMD_TYPE=ssh pdsh -S -f 1024 -w "$(IFS=,; echo "${hosts[*]}")" \
            "pids=\$(pgrep -d, -f '$pattern'); [ -z \"\$pids\" ] || pkill -TERM -P \"\$pids\""
    }
    REMOTE_STOP=remote_stop
fi

cmd=("$PYTHON" "$LAUNCH_DIR/deepspeed_runner.py" --hostfile "$hostfile" "${select[@]}" --master_port "$port"
    --module deepseek_pt.train --config "$config" "$@")
log "${#hosts[@]} hosts (${hosts[*]}), $world processes"
print_cmd "${cmd[@]}"
status=0
run_supervised "${cmd[@]}" || status=$?
exit "$status"
