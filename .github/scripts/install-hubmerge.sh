#!/usr/bin/env bash
# Install hubmerge ($HUBMERGE_SPEC: a pip requirement or a source folder) into the current `python`,
# every dependency checked against a hash: the jobs that run it hold a write token (never this step).
#
#   1. hubmerge's dependencies and torch's, from .github/requirements/hubmerge.txt (--require-hashes); when
#      RECIPE names a recipe with an [eval] table, then eval.txt too: hubmerge.txt at the same versions plus
#      the `eval` extra's tree (lm-eval, accelerate, matplotlib). The merge step, which holds the token,
#      installs nothing;
#   2. the CPU build of PyTorch (runners have no GPU, and the default wheel brings several GB of CUDA
#      libraries), pinned by version on PyTorch's own index; the requirements files cannot carry its
#      hash, since they are compiled from PyPI, which has no CPU-only Linux wheel;
#   3. hubmerge itself, without dependencies. From a source folder it is the checked-out commit; a
#      recipes repository pins a release or a commit in HUBMERGE_SPEC, and copies the requirements of that
#      same release or commit into its .github/requirements/.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "$0")/lib.sh"
: "${HUBMERGE_SPEC:?set HUBMERGE_SPEC to what pip should install, e.g. hubmerge==0.1.0}"
if ! python -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  # The requirements are compiled for 3.11+ (3.10 would need tomli), and the scripts read recipes with tomllib.
  echo "::error::hubmerge's workflow scripts need Python 3.11 or later; $(python --version) is on PATH"
  exit 1
fi
requirements="$(dirname "$0")/../requirements"
has_eval=false
if [[ -n ${RECIPE:-} ]]; then
  has_eval=$(recipe_has_eval "$RECIPE") # an assignment, so that a failure stops the step
fi
torch_version=2.13.0
# --no-deps: each file is a complete, compiled closure (torch apart), so nothing unhashed comes in as a
# dependency.
python -m pip install --progress-bar off --require-hashes --no-deps -r "$requirements/hubmerge.txt"
if [[ $has_eval == true ]]; then
  # Some of it is source only (rouge-score): built with the hashed setuptools of hubmerge.txt, never with a
  # build backend fetched unchecked into an isolated build environment.
  python -m pip install --progress-bar off --require-hashes --no-deps --no-build-isolation -r "$requirements/eval.txt"
fi
python -m pip install --progress-bar off --no-deps "torch==$torch_version" --index-url https://download.pytorch.org/whl/cpu
python -m pip install --progress-bar off --no-deps --no-build-isolation "$HUBMERGE_SPEC"
python -m pip check
hubmerge --version
