#!/usr/bin/env bash
# The GPU benchmark matrix in one device call: HF + DeepSpeed peer and deepseek_pt, same shape.
# Usage: [CASE_TIMEOUT=seconds] bench/gpu_bench.sh [CASES_FILE]   (each line: --impl ours|hf [overrides]; the
# case files behind docs/benchmarks.md's tables are in bench/cases/)
# On the device machine, wheels for what its image lacks (deepspeed, hjson, pydantic, torchao) come
# from .whl/ (see docs/benchmarks.md).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
source bench/device_env.sh
mkdir -p "${OUT:-/tmp}" || exit 1
out=${OUT:-/tmp}/gpu_bench.jsonl
: > "$out"
cases=${1:-bench/cases/default.txt}
n=0
while read -r line; do
  [ -z "$line" ] || [ "${line:0:1}" = "#" ] && continue
  n=$((n + 1))
  log="${out%.jsonl}.$n.$(echo "$line" | tr -c 'a-z0-9' '_' | cut -c1-60).log"  # stdout and stderr: what it got to
  # shellcheck disable=SC2086
  timeout "${CASE_TIMEOUT:-300}" python3 bench/gpu_bench.py $line > "$log" 2>&1 < /dev/null
  rc=$?
  result=$(grep '^{' "$log")
  if [ -n "$result" ]; then
    # A case that printed its measurement and then failed on the way out (124: CASE_TIMEOUT ran out in teardown)
    # keeps its figures, flagged with the exit status.
    [ "$rc" -eq 0 ] || result="${result%\}}, \"exit_status\": $rc}"
    tee -a "$out" <<< "$result"
  else
    echo "{\"failed\": \"$line\", \"exit_status\": $rc}" | tee -a "$out"
  fi
  [ "$rc" -ne 124 ] || echo "timed out after CASE_TIMEOUT=${CASE_TIMEOUT:-300} s" >&2
  [ "$rc" -eq 0 ] || grep -v -e WARN -e INFO "$log" | tail -n 8 >&2  # why, without waiting for the files to come back
done < "$cases"
python3 - "$out" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
peer = {(r["seq"], r["micro_batch"]): r["tokens_per_s"] for r in rows if r.get("impl") == "hf"}
print(f"{'impl':5} {'prec':5} {'seq':>5} {'mb':>3} {'tok/s':>8} {'MFU':>6} {'mem GiB':>8} {'x peer':>7}  overrides")
for r in rows:
    if "failed" in r:
        print("FAILED", r["failed"]); continue
    ratio = r["tokens_per_s"] / peer[(r["seq"], r["micro_batch"])] if (r["seq"], r["micro_batch"]) in peer else float("nan")
    exited = f"  (exit status {r['exit_status']} after its result)" if "exit_status" in r else ""
    print(f"{r['impl']:5} {r['precision']:5} {r['seq']:>5} {r['micro_batch']:>3} {r['tokens_per_s']:>8} {r['mfu'] or 0:>6.3f} {r['peak_mem_gib']:>8} {ratio:>7.2f}  {' '.join(r['overrides'])}{exited}")
PY
