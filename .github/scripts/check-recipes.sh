#!/usr/bin/env bash
# The pull-request check of merge.yml: `hubmerge validate` and `hubmerge plan` on each recipe of RECIPES
# (a JSON list). It needs no token and downloads no weights: a plan resolves revisions and reads
# config.json and safetensors headers only. Each plan goes to the job summary, escaped: hubmerge appends its
# sources table with the resolved shas, and this script the full plan (downloads, memory, disk).
# Every recipe is checked; the step fails if any failed.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "$0")/lib.sh"
: "${RECIPES:?set RECIPES to a JSON list of recipe paths}"

listed=$(python -c 'import json, os; print("\n".join(json.loads(os.environ["RECIPES"])))')
mapfile -t recipes <<<"$listed"
failed=0
for recipe in "${recipes[@]}"; do
  echo "::group::$recipe"
  if hubmerge_or_fail "$recipe" validate "$recipe" && hubmerge_or_fail "$recipe" plan "$recipe"; then
    {
      printf '<details><summary>Full plan of <code>%s</code></summary>\n\n<pre>\n' "$recipe"
      # The plan quotes Hub metadata (config values, names): escaped, it cannot end the block or add HTML.
      python -c 'import html, sys; sys.stdout.write(html.escape(sys.stdin.read()))' <"$hubmerge_out"
      printf '</pre>\n</details>\n\n'
    } >>"${GITHUB_STEP_SUMMARY:-/dev/null}"
  else
    failed=1
  fi
  echo "::endgroup::"
done
exit "$failed"
