# Shared by the scripts that run hubmerge in GitHub Actions (source it; it is not a command).
# shellcheck shell=bash

# The Hugging Face cache lives in the workspace: /tmp is RAM-backed on newer runners, and a merge
# downloads several GB of weights.
export HF_HOME=${HF_HOME:-${GITHUB_WORKSPACE:-$PWD}/.cache/huggingface}

hubmerge_out=$(mktemp)
trap 'rm -f "$hubmerge_out"' EXIT

# What each of hubmerge's documented exit codes means for the person reading the annotation.
exit_meaning() {
  case $1 in
    2) echo "recipe error" ;;
    3) echo "source error" ;;
    4) echo "incompatible sources" ;;
    5) echo "model card error" ;;
    6) echo "publish error" ;;
    7) echo "evaluation error" ;;
    8) echo "evaluation gate missed" ;;
    70) echo "internal error" ;;
    130) echo "interrupted" ;;
    143) echo "terminated" ;;
    *) echo "failed" ;;
  esac
}

# hubmerge_or_fail RECIPE ARGS...: run `hubmerge ARGS...`, with its stdout kept in $hubmerge_out (and
# shown) and its stderr shown as it comes. On failure, put hubmerge's one-line error on RECIPE as an
# error annotation titled by the meaning of the exit code, and return that code.
hubmerge_or_fail() {
  local recipe=$1 err status=0 line
  shift
  err=$(mktemp)
  # stderr through tee (shown live, kept for the annotation), stdout to the file; with pipefail the
  # status is hubmerge's.
  hubmerge "$@" 2>&1 >"$hubmerge_out" | tee "$err" >&2 || status=$?
  cat "$hubmerge_out"
  if ((status != 0)); then
    line=$(grep -E '^hubmerge: ' "$err" | tail -n 1 || true)
    line=${line:-hubmerge exited with $status; see the log}
    line=${line//%/%25}
    echo "::error file=$recipe,title=hubmerge $(exit_meaning "$status") (exit $status)::${line//$'\r'/%0D}"
  fi
  rm -f "$err"
  return "$status"
}

# recipe_has_eval RECIPE: print "true" when RECIPE has an [eval] table with tasks, else "false". A recipe that
# does not parse, or a Python without tomllib, fails the caller (set -e): an [eval] gate is never skipped
# silently.
recipe_has_eval() {
  python -c 'import sys, tomllib
with open(sys.argv[1], "rb") as f:
    print("true" if tomllib.load(f).get("eval", {}).get("tasks") else "false")' "$1"
}
