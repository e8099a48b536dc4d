# shellcheck shell=bash
# Sourced by launch/train.sh, node.sh and hostfile.sh: environment, validation before anything
# starts, and a supervised deepspeed launcher that turns SIGTERM/SIGINT/SIGUSR1/SIGHUP into a checkpoint
# at the end of the current step and exit 0. docs/launch.md describes the behaviour.

LAUNCH_DIR=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd -- "$LAUNCH_DIR/.." && pwd)

log() { printf '[launch] %s\n' "$*" >&2; }

die() {  # die EXIT_CODE MESSAGE
    local code=$1
    shift
    printf '[launch] error: %s\n' "$*" >&2
    exit "$code"
}

is_uint() { [[ $1 =~ ^[0-9]+$ ]]; }

# require_uint VALUE MIN MAX MESSAGE: die with MESSAGE unless VALUE is an integer in [MIN, MAX]
# (MAX empty: no upper bound).
require_uint() {
    local value=$1 min=$2 max=$3 message=$4
    # At most 18 significant digits: bash arithmetic is 64-bit and wraps (2**64 would read as 0).
    [[ $value =~ ^0*([0-9]{1,18})$ ]] || die 2 "$message"
    value=$((10#${BASH_REMATCH[1]}))
    if ((value < min)) || { [[ -n $max ]] && ((value > max)); }; then
        die 2 "$message"
    fi
}

# visible_device_ids N: the first N ids of CUDA_VISIBLE_DEVICES into the array `ids`, each numeric: the
# runner's --include parses them as integers (GPU-/MIG- UUIDs would end in its traceback).
visible_device_ids() {
    IFS=, read -r -a ids <<<"$CUDA_VISIBLE_DEVICES"
    ids=("${ids[@]:0:$1}")
    for id in "${ids[@]}"; do
        is_uint "$id" || die 2 "CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES: ${0##*/} needs numeric device ids"
    done
}

# usage: the calling script's header comment (its lines after the shebang, up to the first that is not a
# comment) on stderr, and exit status 2: what a call without its arguments gets.
usage() {
    header >&2
    exit 2
}

# -h / --help: the same text on stdout, and success.
help_if_asked() {
    if [[ ${1:-} == -h || ${1:-} == --help ]]; then
        header
        exit 0
    fi
}

# The calling script's leading comment block, without its '#'s.
header() {
    awk 'NR == 1 { next } !/^#/ { exit } { sub(/^# ?/, ""); print }' "$0"
}

# PYTHON: the interpreter that has torch + deepspeed (it also runs the ranks: the deepspeed launcher
# starts them with its own sys.executable). Default: $VIRTUAL_ENV's, else python3 on PATH.
resolve_python() {
    if [[ -z ${PYTHON:-} ]]; then
        if [[ -n ${VIRTUAL_ENV:-} && -x $VIRTUAL_ENV/bin/python ]]; then
            PYTHON=$VIRTUAL_ENV/bin/python
        else
            PYTHON=$(command -v python3 || command -v python || true)
        fi
    fi
    [[ -n $PYTHON ]] || die 2 "no python found: set PYTHON=/path/to/venv/bin/python"
    command -v pgrep >/dev/null || die 2 "pgrep (procps) is required to supervise the ranks"
}

# Sets DEVICE_KIND (cuda|cpu) and DEVICE_COUNT (GPUs visible to this process; 0 on CPU).
detect_devices() {
    local out
    out=$("$PYTHON" "$LAUNCH_DIR/plan.py" devices) || die 2 "could not inspect the devices with $PYTHON"
    # shellcheck disable=SC2034  # read by the scripts that source this file
    read -r DEVICE_KIND DEVICE_COUNT <<<"$out"
}

# The environment every launch gets; variables the user already set are kept.
setup_env() {
    # NVLink SHARP / multicast: off. They need fabric-manager multicast objects that many hosts
    # (and VMs, MIG, containers) lack, and NCCL/symmetric memory/NVSHMEM fail or hang at init there.
    export NCCL_NVLS_ENABLE="${NCCL_NVLS_ENABLE:-0}"
    export TORCH_SYMM_MEM_DISABLE_MULTICAST="${TORCH_SYMM_MEM_DISABLE_MULTICAST:-1}"
    export NVSHMEM_DISABLE_NVLS="${NVSHMEM_DISABLE_NVLS:-1}"
    # DeepSpeed's op builder cannot parse arch-specific entries such as "9.0a" (Hopper images set
    # it): FusedAdam's JIT build fails with "invalid literal for int()". "9.0" builds the same ops.
    if [[ ${TORCH_CUDA_ARCH_LIST:-} =~ [0-9]a ]]; then
        local fixed
        fixed=$(sed -E 's/([0-9]+\.[0-9]+)a/\1/g' <<<"$TORCH_CUDA_ARCH_LIST")
        log "TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST -> $fixed (DeepSpeed's op builder cannot parse 'a' archs)"
        export TORCH_CUDA_ARCH_LIST=$fixed
    fi
    if [[ $DEVICE_KIND == cpu ]]; then
        export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"  # N ranks x all-core OpenMP pools oversubscribe
        export PYTHONWARNINGS="${PYTHONWARNINGS:-ignore}"  # gloo warns on every collective
    fi
    export PYTHONPATH="$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}"
}

# validate WORLD_SIZE PROCS_PER_NODE CONFIG [overrides...]: the trainer's own --check-only, for the planned
# world size (so parallel.expert_parallel_size is checked against it) and processes per node (the host memory
# a whole-model build takes). Exits 2 on a bad config.
validate() {
    local world=$1 per_node=$2 config=$3
    shift 3
    [[ -f $config ]] || die 2 "$config: config file not found (nothing started)"
    # read only when processes outlive the launcher, in the supervisor's arithmetic: checked now, not then
    require_uint "${DRAIN_TIMEOUT:-90}" 1 "" "DRAIN_TIMEOUT=${DRAIN_TIMEOUT:-}: expected seconds, a positive integer"
    DRAIN_TIMEOUT=$((10#${DRAIN_TIMEOUT:-90}))  # decimal, as validated: "08" would be bad octal in the supervisor
    if ! WORLD_SIZE=$world LOCAL_SIZE=$per_node "$PYTHON" -m deepseek_pt.train --check-only --config "$config" "$@" >/dev/null; then
        die 2 "$config: the configuration was refused for $world processes (nothing started)"
    fi
    RUN_DIR=$("$PYTHON" "$LAUNCH_DIR/plan.py" run-dir "$config" "$@")
    log "config ok for $world processes: $config -> run.dir $RUN_DIR"
}

# ------------------------------------------------------------------------------------------------
# Supervision. The launcher runs in a process group of its own (JOB_PGID); on the first
# SIGTERM/SIGINT/SIGUSR1/SIGHUP the supervisor sends SIGTERM to the training ranks only (the children of
# this job's deepspeed.launcher.launch), never to the launcher: train.py checkpoints at the end of
# the step and exits 0, so the launcher exits 0 with them and no 30 s kill timer runs. SIGUSR1 is
# ignored by every process of the job, so a scheduler may deliver it to all of them (SLURM
# --signal=USR1@T) and only the supervisor acts on it. A second signal kills the job.

JOB_PGID=""
STOP_SIGNAL=""
STOP_COUNT=0
LATEST_BEFORE=-1
_TRAPPED=0
REMOTE_STOP=""  # optional function that stops the ranks on other hosts (hostfile.sh)

# Step of <run.dir>/checkpoints/latest if that checkpoint is complete (meta.json), else -1.
latest_complete_step() {
    local file=$RUN_DIR/checkpoints/latest tag
    [[ -f $file ]] || { echo -1; return 0; }
    tag=$(<"$file")
    tag=${tag//[[:space:]]/}
    if [[ $tag =~ ^step_([0-9]+)$ && -f $RUN_DIR/checkpoints/$tag/meta.json ]]; then
        echo $((10#${BASH_REMATCH[1]}))
    else
        echo -1
    fi
    return 0
}

rank_pids() {
    local launcher found=""
    for launcher in $(pgrep -g "$JOB_PGID" -f 'deepspeed[.]launcher[.]launch' || true); do
        found+="$(pgrep -P "$launcher" || true) "
    done
    # launch.py killed: its ranks, reparented, are still of the job's group (launch.py gives each its --local_rank)
    [[ -n ${found// /} ]] || found=$(pgrep -g "$JOB_PGID" -f -- '--local_rank=' || true)
    # shellcheck disable=SC2086  # split and joined: one line of pids
    echo $found
    return 0
}

# Runs as a trap: every path returns 0 explicitly (a bare `return` in a trap handler returns the
# status of the interrupted `wait`, 128+n, which `set -e` would turn into an exit).
on_signal() {
    local sig=$1
    _TRAPPED=1
    STOP_COUNT=$((STOP_COUNT + 1))
    if ((STOP_COUNT > 1)); then
        log "SIG$sig again: killing the job now (the last complete checkpoint stays the resume point)"
        kill -KILL -- "-$JOB_PGID" 2>/dev/null || true
        return 0
    fi
    STOP_SIGNAL=$sig
    LATEST_BEFORE=$(latest_complete_step) || LATEST_BEFORE=-1
    stop_ranks "SIG$sig"
    return 0
}

# stop_ranks WHY: ask the job's ranks to checkpoint at the end of this step and exit, as a stop signal does: on every
# host through REMOTE_STOP (hostfile.sh), else SIGTERM to this node's ranks; with no rank running, the launcher's
# group. WHY begins the line it logs.
stop_ranks() {
    local why=$1 pids
    if [[ -n $REMOTE_STOP ]]; then
        log "$why: asking the ranks on every host to checkpoint at the end of this step and exit"
        "$REMOTE_STOP" || log "could not reach every host"
        return 0
    fi
    pids=$(rank_pids) || true
    if [[ -n $pids ]]; then
        log "$why: asking the ranks ($pids) to checkpoint at the end of this step and exit"
        # shellcheck disable=SC2086  # one pid per word
        kill -TERM $pids 2>/dev/null || true
    else
        log "$why, and no rank runs: stopping the launcher"
        # No such group yet while plan.py has not called setpgid: the launcher process itself then.
        kill -TERM -- "-$JOB_PGID" 2>/dev/null || kill -TERM "$JOB_PGID" 2>/dev/null || true
    fi
    return 0
}

# run_supervised PROGRAM [ARGS...]: start the launcher, wait for it and every process of its group,
# and return its status, except that after a stop signal the status is 0 when the ranks exited 0 or
# a newer complete checkpoint exists (the launcher itself may have been signalled too and exit 1).
run_supervised() {
    local status pid waited=0 orphans=0
    trap 'on_signal TERM' TERM
    trap 'on_signal INT' INT
    trap 'on_signal USR1' USR1
    # A hangup (terminal or ssh session gone) reaches only this script, not the job's own process group:
    # stopped like SIGTERM, not left training unsupervised. (Under nohup, HUP is ignored and stays so.)
    trap 'on_signal HUP' HUP
    # exec-group: own process group; SIGUSR1 ignored (inherited through exec by launcher and ranks).
    (
        trap '' USR1
        exec "$PYTHON" "$LAUNCH_DIR/plan.py" exec-group "$@"
    ) &
    pid=$!
    JOB_PGID=$pid
    while :; do
        _TRAPPED=0
        wait "$pid" && status=0 || status=$?
        ((_TRAPPED)) || break  # a trap interrupts wait with 128+n: wait again for the real status
    done
    # Killed rather than exited (the runner, its launch.py or pdsh), the launcher leaves ranks that would end as
    # orphans at their watch's next poll without a checkpoint (engine/peer_failure.py), and under hostfile.sh pdsh's
    # ssh sessions, under which every host's launch.py and ranks train on until the drain below kills pdsh: stop them
    # as a stop signal does, so that they checkpoint and exit, and wait however long that takes (the drain's kill
    # would cut the checkpoint short).
    # (A launcher that exited 128+N for a rank's failure has no process of the job left behind.)
    if [[ -z $STOP_SIGNAL ]] && ((status > 128)) && pgrep -g "$JOB_PGID" >/dev/null; then
        orphans=1
        LATEST_BEFORE=$(latest_complete_step) || LATEST_BEFORE=-1
        stop_ranks "the launcher was killed (exit $status) while processes of the job run on"
        STOP_COUNT=1  # a signal from here on kills the job, as a second one does
    fi
    # The launcher is gone; ranks and launch.py may still be finishing (e.g. if the signal reached
    # the launcher too). Wait for the group to drain; launch.py kills its ranks after 30 s itself.
    while pgrep -g "$JOB_PGID" >/dev/null; do
        if ((waited == ${DRAIN_TIMEOUT:-90} && !orphans)); then
            log "processes of the job still alive ${waited}s after the launcher exited: killing them"
            kill -KILL -- "-$JOB_PGID" 2>/dev/null || true
        fi
        sleep 1
        waited=$((waited + 1))
    done
    trap - TERM INT USR1 HUP
    local after
    after=$(latest_complete_step)
    if ((orphans)); then
        if ((after > LATEST_BEFORE)); then
            log "the ranks stopped: checkpoint step $after completed after the launcher was killed; resume with train.resume=auto"
        else
            log "the ranks stopped without a new complete checkpoint; latest complete: step $after"
        fi
    fi
    if [[ -z $STOP_SIGNAL ]]; then
        return "$status"
    fi
    if ((status == 0)); then
        log "stopped on SIG$STOP_SIGNAL: every rank exited cleanly; latest checkpoint step $after in $RUN_DIR/checkpoints"
        return 0
    fi
    if ((after > LATEST_BEFORE)); then
        log "stopped on SIG$STOP_SIGNAL: checkpoint step $after completed after the signal (launcher exit $status); resume with train.resume=auto"
        return 0
    fi
    log "stopped on SIG$STOP_SIGNAL without a new complete checkpoint (launcher exit $status); latest complete: step $after"
    return "$status"
}

print_cmd() {
    local q
    printf -v q '%q ' "$@"
    log "running: ${q% }"
}
