#!/usr/bin/env bash
# Make room for a merge (three 1.5B sources and the output take ~15 GB) on a GitHub-hosted Ubuntu
# runner by deleting toolchains hubmerge never uses. Anywhere else (a self-hosted runner, a laptop)
# those folders may be in use, so it only reports the free space.
set -euo pipefail
if [[ ${RUNNER_ENVIRONMENT:-} == github-hosted && ${RUNNER_OS:-} == Linux ]]; then
  sudo rm -rf /usr/share/dotnet /usr/local/lib/android /opt/ghc /usr/local/.ghcup \
    /opt/hostedtoolcache/CodeQL /usr/local/share/boost /usr/share/swift
  sudo docker image prune --all --force >/dev/null || true
else
  echo "free-disk-space: not a GitHub-hosted Linux runner; deleting nothing"
fi
df -h "${GITHUB_WORKSPACE:-.}"
