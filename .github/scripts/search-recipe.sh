#!/usr/bin/env bash
# Search RECIPE's [search] values: the search job of search.yml. The results go to the folder beside the
# recipe named after it (recipes/my-merge.toml → recipes/my-merge-search/), where best.toml names local
# folders correctly, and which the pull-request job commits.
#
#   RECIPE   the recipe file, with a [search] table
#   TRIALS   how many trials (empty: the recipe's [search] trials)
#
# Writes `results` (that folder) to $GITHUB_OUTPUT and the best trial to the job summary.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "$0")/lib.sh"
: "${RECIPE:?set RECIPE to the recipe path}"

results=${RECIPE%.toml}-search
args=(search "$RECIPE" --output "$results")
if [[ -n ${TRIALS:-} ]]; then
  args+=(--trials "$TRIALS")
fi
hubmerge_or_fail "$RECIPE" "${args[@]}"
echo "results=$results" >>"${GITHUB_OUTPUT:-/dev/null}"
{
  echo "### Searched \`$(basename "$RECIPE")\`"
  echo
  sed -n 's/^# //p' "$results/best.toml"
  echo
  echo "The results are in the artifact \`search-results\` (\`$results/\`)."
} >>"${GITHUB_STEP_SUMMARY:-/dev/null}"
