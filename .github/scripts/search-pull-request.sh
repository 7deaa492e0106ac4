#!/usr/bin/env bash
# Open a pull request that adds a search's best.toml and results beside its recipe: the pull-request job of
# search.yml. Merging it into main makes merge.yml merge best.toml and push it, with a review in between.
#
#   RECIPE    the recipe that was searched
#   RESULTS   the folder the results were downloaded to (RECIPE without .toml, plus -search)
#   BASE      the branch the pull request goes into
#   RUN_ID    the workflow run, which names the new branch
#   GH_TOKEN  for gh and git push: the job's GITHUB_TOKEN (contents and pull-requests: write)
#
# Commits only best.toml, search_results.json and .csv and the plots; the study stays in the artifact.
set -euo pipefail
: "${RECIPE:?set RECIPE}" "${RESULTS:?set RESULTS}" "${BASE:?set BASE}" "${RUN_ID:?set RUN_ID}"

if [[ ! -f $RESULTS/best.toml ]]; then
  echo "::error file=$RECIPE,title=no best.toml::the search completed no trial; there is nothing to propose"
  exit 1
fi
files=()
for name in best.toml search_results.json search_results.csv search_objective.png search_params.png \
  search_importance.png; do
  if [[ -f $RESULTS/$name ]]; then
    files+=("$RESULTS/$name")
  fi
done
name=$(basename "${RECIPE%.toml}")
branch="hubmerge-search/$name-$RUN_ID"
git switch --quiet --create "$branch"
git add -- "${files[@]}"
git -c user.name="github-actions[bot]" -c user.email="41898282+github-actions[bot]@users.noreply.github.com" \
  commit --quiet --message "hubmerge search: the best values found for $RECIPE"
gh auth setup-git # git push authenticates with GH_TOKEN
git push --quiet origin "$branch"
body=$(
  sed -n 's/^# //p' "$RESULTS/best.toml"
  echo
  echo "Merging this adds \`$RESULTS/best.toml\` to the recipes: merge.yml then merges it and pushes it."
)
gh pr create --base "$BASE" --head "$branch" --title "hubmerge search: $name" --body "$body"
