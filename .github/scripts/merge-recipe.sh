#!/usr/bin/env bash
# Merge RECIPE and push it to its [output] repo: the merge job of merge.yml, and action.yml.
#
#   RECIPE    the recipe file
#   PUSH      "false" only writes the output folder (default "true")
#   MAX_DISK  the disk the merge may use ("40GB"); empty: the runner's free disk, which is hubmerge's own
#             default (the free space of the HF cache's and the output's filesystems, minus a margin).
#             Sources that do not fit are streamed from the Hub by range instead of downloaded.
#   HF_TOKEN  a token with write access; when empty, the push authenticates by Hugging Face trusted
#             publishing, scoped to the recipe's [output] repo (HF_OIDC_RESOURCE), which needs the job
#             permission `id-token: write` and a trusted publisher on that repo
#
# hubmerge appends the job summary itself ($GITHUB_STEP_SUMMARY: sources, resolved shas, commit URL).
# A recipe with an [eval] table is evaluated before the push (`hubmerge RECIPE --eval`): its results table
# goes to the job summary, and a merge that misses `[eval] require` is not pushed (exit 8).
# Writes `commit-url` (empty without a push) to $GITHUB_OUTPUT.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "$0")/lib.sh"
: "${RECIPE:?set RECIPE to the recipe path}"

args=("$RECIPE")
if [[ -n ${MAX_DISK:-} ]]; then
  args+=(--max-disk "$MAX_DISK")
fi
if [[ ${PUSH:-true} == false ]]; then
  args+=(--no-push)
elif [[ -z ${HF_TOKEN:-} ]]; then
  hubmerge_or_fail "$RECIPE" plan "$RECIPE" --json --summary /dev/null
  repo=$(python -c 'import json, sys; push = json.load(sys.stdin)["push"]; print(push["repo"] if push else "")' <"$hubmerge_out")
  if [[ -n $repo ]]; then
    echo "No HF_TOKEN: pushing to $repo with Hugging Face trusted publishing (OIDC)"
    export HF_OIDC_RESOURCE=$repo
  fi
fi

has_eval=$(recipe_has_eval "$RECIPE")
if [[ $has_eval == true ]]; then
  # This step holds the token, so it installs nothing: install-hubmerge.sh, given RECIPE, installed the
  # eval extra from hashed requirements.
  if ! python -c 'import lm_eval, accelerate, matplotlib' 2>/dev/null; then
    line="hubmerge: error: $RECIPE has an [eval] table but lm-eval is not installed; run install-hubmerge.sh with RECIPE set in the install step"
    echo "::error file=$RECIPE,title=hubmerge evaluation error (exit 7)::$line"
    exit 7
  fi
  args+=(--eval)
fi

hubmerge_or_fail "$RECIPE" "${args[@]}"
commit_url=$(grep -E '^https?://' "$hubmerge_out" | tail -n 1 || true)
echo "commit-url=$commit_url" >>"${GITHUB_OUTPUT:-/dev/null}"
