#!/usr/bin/env bash
# Which recipes a run of merge.yml acts on: recipes/**.toml files, as a JSON list for a job matrix.
#
#   RECIPE set (workflow_dispatch)           that recipe alone; it must be a tracked recipes/**.toml path
#   BASE_SHA empty or all zeros (new branch)  every recipe in HEAD_SHA: there is nothing to compare with
#   BASE_SHA not in the clone (force push)    every recipe in HEAD_SHA, with a warning
#   otherwise                                 what a pull request from BASE_SHA to HEAD_SHA shows as added,
#                                             modified or renamed (`git diff BASE...HEAD`); deletions drop out
#
# Writes `recipes` (JSON list) and `count` to $GITHUB_OUTPUT and prints one recipe a line. Names are
# limited to letters, digits, space and `_./+@-`, so the JSON needs no escaping and no name can smuggle
# workflow commands or options into later steps.
set -euo pipefail

head=${HEAD_SHA:-HEAD}
safe_name='^[A-Za-z0-9_.][A-Za-z0-9_./+@ -]*$'
recipes=()

add() {
  if [[ ! $1 =~ $safe_name ]]; then
    echo "::error::a recipe path has characters outside letters, digits, space and _./+@-; rename it: ${1//[^A-Za-z0-9_.\/+@ -]/?}"
    exit 1
  fi
  recipes+=("$1")
}

list=$(mktemp)
trap 'rm -f "$list"' EXIT
if [[ -n ${RECIPE:-} ]]; then
  recipe=${RECIPE#./}
  mapfile -t -d '' tracked < <(git ls-files -z -- ":(literal)$recipe")
  # Exactly the tracked path, so that one recipe never runs under two concurrency groups.
  if [[ $recipe != recipes/*.toml || ${#tracked[@]} -ne 1 || ${tracked[0]} != "$recipe" ]]; then
    echo "::error::the recipe input must be the path of a tracked recipes/**.toml file, as git spells it"
    exit 1
  fi
  printf '%s\0' "$recipe" >"$list"
elif [[ -z ${BASE_SHA:-} || $BASE_SHA =~ ^0+$ ]]; then
  git ls-tree -r -z --name-only "$head" -- recipes >"$list"
elif ! git cat-file -e "$BASE_SHA^{commit}" 2>/dev/null; then
  echo "::warning::$BASE_SHA is not in the clone (force push?); taking every recipe in $head"
  git ls-tree -r -z --name-only "$head" -- recipes >"$list"
else
  git diff -z --name-only --no-renames --diff-filter=d "$BASE_SHA...$head" -- recipes >"$list"
fi
while IFS= read -r -d '' path; do
  if [[ $path == *.toml ]]; then add "$path"; fi
done <"$list"

json=""
for recipe in "${recipes[@]}"; do
  json+="${json:+, }\"$recipe\""
  echo "$recipe"
done

if [[ -n ${GITHUB_OUTPUT:-} ]]; then
  printf 'recipes=[%s]\ncount=%d\n' "$json" "${#recipes[@]}" >>"$GITHUB_OUTPUT"
fi
