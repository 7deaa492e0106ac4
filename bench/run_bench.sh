#!/usr/bin/env bash
# hubmerge vs mergekit 0.1.5 on four Qwen2.5-1.5B-shaped bf16 checkpoints (base + 3), in one session.
#
#   bash bench/run_bench.sh            # all methods; outputs deleted after their checks
#   KEEP=1 bash bench/run_bench.sh     # keep the merged outputs under bench/work/out/
#   METHODS="ties" bash bench/run_bench.sh
#
# Needs: bench/make_checkpoints.py run first (bench/work/models/{base,math,coder,instruct}),
# hubmerge in /work/venv, mergekit in /work/mk-venv (python3 -m venv /work/mk-venv &&
# /work/mk-venv/bin/pip install torch==2.13.0 mergekit), GNU time at /usr/bin/time.
#
# For each method: warm the page cache (cat the 4 inputs > /dev/null), run hubmerge under
# /usr/bin/time -v, warm again, run mergekit under /usr/bin/time -v; record wall time, peak RSS,
# CPU time and the 1/5/15-minute load average just before each run. Then compare the two outputs.
# Results: bench/work/logs/<stamp>/results.tsv, checks.jsonl, machine.txt and one .time/.log per run.
set -u

BENCH=$(cd "$(dirname "$0")" && pwd)
WORK=$BENCH/work
MODELS=$WORK/models
OUT=$WORK/out
STAMP=$(date +%Y%m%d-%H%M%S)
LOG=$WORK/logs/$STAMP
HUBMERGE=/work/venv/bin/hubmerge
PY=/work/venv/bin/python
MERGEKIT=/work/mk-venv/bin/mergekit-yaml
METHODS=${METHODS:-"simple_average task_arithmetic ties"}
KEEP=${KEEP:-0}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

mkdir -p "$OUT" "$LOG"
ln -sfn "$LOG" "$WORK/logs/latest"
[ -x /usr/bin/time ] || { echo "GNU time missing: apt-get install -y time" >&2; exit 1; }
for m in base math coder instruct; do
  [ -f "$MODELS/$m/model.safetensors" ] || { echo "missing $MODELS/$m; run bench/make_checkpoints.py" >&2; exit 1; }
done

{
  echo "date: $(date -Is)"
  echo "host: $(uname -srm)"
  echo "nproc: $(nproc)"
  echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //')"
  echo "free -g:"; free -g
  echo "disk: $(df -h "$WORK" | tail -1)"
  echo "hubmerge venv: $($PY -c 'import sys, torch, safetensors, hubmerge; print("python", sys.version.split()[0], "torch", torch.__version__, "safetensors", safetensors.__version__, "hubmerge", hubmerge.__version__)')"
  echo "mergekit venv: $(/work/mk-venv/bin/python -c 'import sys, torch, safetensors, transformers; from importlib.metadata import version; print("python", sys.version.split()[0], "torch", torch.__version__, "safetensors", safetensors.__version__, "transformers", transformers.__version__, "mergekit", version("mergekit"))')"
  echo "torch threads (hubmerge venv): $($PY -c 'import torch; print(torch.get_num_threads())')"
  echo "hubmerge source: HEAD $(git -C "$BENCH/.." rev-parse --short HEAD), uncommitted: $(git -C "$BENCH/.." diff --stat -- hubmerge | tail -1), sha256 of hubmerge/*.py: $(cat "$BENCH"/../hubmerge/*.py | sha256sum | cut -c1-16) (copy in hubmerge-src/)"
  echo "inputs:"; for m in base math coder instruct; do echo "  $m $(stat -c %s "$MODELS/$m/model.safetensors") bytes"; done
  echo "inputs total: $(du -cb "$MODELS"/*/model.safetensors | tail -1 | cut -f1) bytes"
} > "$LOG/machine.txt"
cat "$LOG/machine.txt"
mkdir -p "$LOG/hubmerge-src" && cp "$BENCH"/../hubmerge/*.py "$LOG/hubmerge-src/"

printf 'run\ttool\tmethod\trc\twall_s\tpeak_rss_kb\tuser_s\tsys_s\tcpu_pct\tload_before\tload_after\tout_bytes\tcommand\n' > "$LOG/results.tsv"

warm() { cat "$MODELS"/*/model.safetensors > /dev/null; }

# measure RUN TOOL METHOD OUTDIR CMD...
measure() {
  local run=$1 tool=$2 method=$3 outdir=$4; shift 4
  rm -rf "$outdir"
  warm
  local before after rc wall rss user sys cpu bytes
  before=$(cut -d' ' -f1-3 /proc/loadavg)
  echo "== $run (load $before): $*"
  /usr/bin/time -v -o "$LOG/$run.time" "$@" > "$LOG/$run.log" 2>&1
  rc=$?
  after=$(cut -d' ' -f1-3 /proc/loadavg)
  wall=$(awk -F': ' '/Elapsed \(wall clock\)/ {n=split($2,a,":"); s=0; for(i=1;i<=n;i++) s=s*60+a[i]; print s}' "$LOG/$run.time")
  rss=$(awk -F': ' '/Maximum resident set size/ {print $2}' "$LOG/$run.time")
  user=$(awk -F': ' '/User time/ {print $2}' "$LOG/$run.time")
  sys=$(awk -F': ' '/System time/ {print $2}' "$LOG/$run.time")
  cpu=$(awk -F': ' '/Percent of CPU/ {print $2}' "$LOG/$run.time")
  bytes=$(du -cb "$outdir"/*.safetensors 2>/dev/null | tail -1 | cut -f1)
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$run" "$tool" "$method" "$rc" "$wall" "$rss" "$user" "$sys" \
    "$cpu" "$before" "$after" "${bytes:-0}" "$*" >> "$LOG/results.tsv"
  echo "   rc=$rc wall=${wall}s maxrss=${rss}kB user=${user}s sys=${sys}s cpu=$cpu load_after=$after"
  [ "$rc" = 0 ] || { echo "   FAILED, last lines of $LOG/$run.log:"; tail -20 "$LOG/$run.log"; }
}

check() {  # check LABEL A B
  echo "== check $1"
  $PY "$BENCH/compare.py" "$2" "$3" --label "$1" | tee -a "$LOG/checks.jsonl"
}

for method in $METHODS; do
  case $method in
    simple_average) mk=linear ;;
    *) mk=$method ;;
  esac
  H=$OUT/hubmerge-$method
  K=$OUT/mergekit-$mk
  measure "hubmerge-$method" hubmerge "$method" "$H" \
    "$HUBMERGE" "$BENCH/configs/hubmerge-$method.toml" --output "$H" -q
  measure "mergekit-$mk" mergekit "$method" "$K" \
    "$MERGEKIT" "$BENCH/configs/mergekit-$mk.yml" "$K"
  check "hubmerge $method vs mergekit $mk" "$H" "$K"
  if [ "$method" = ties ] && [ "${TIES_TENSOR:-1}" = 1 ]; then
    # Extra: hubmerge with mergekit-style per-tensor trim, on the same inputs.
    T=$OUT/hubmerge-ties_tensor
    measure "hubmerge-ties_tensor" hubmerge ties_tensor "$T" \
      "$HUBMERGE" "$BENCH/configs/hubmerge-ties_tensor.toml" --output "$T" -q
    check "hubmerge ties trim=tensor vs mergekit ties" "$T" "$K"
    check "hubmerge ties trim=global vs trim=tensor" "$H" "$T"
    [ "$KEEP" = 1 ] || rm -rf "$T"
  fi
  [ "$KEEP" = 1 ] || rm -rf "$H" "$K"
done

echo
echo "results: $LOG/results.tsv"
column -t -s $'\t' "$LOG/results.tsv" | cut -c1-200
