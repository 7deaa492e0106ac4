#!/usr/bin/env bash
# Install hubmerge ($HUBMERGE_SPEC: a pip requirement or a source folder) into the current `python`,
# every dependency checked against a hash: the jobs that run it hold a write token.
#
#   1. hubmerge's dependencies and torch's, from .github/requirements/hubmerge.txt (--require-hashes);
#   2. the CPU build of PyTorch (runners have no GPU, and the default wheel brings several GB of CUDA
#      libraries), pinned by version on PyTorch's own index; the requirements file cannot carry its
#      hash, since it is compiled from PyPI, which has no CPU-only Linux wheel;
#   3. hubmerge itself, without dependencies. From a source folder it is the checked-out commit; a
#      recipes repository pins a release or a commit in HUBMERGE_SPEC.
set -euo pipefail
: "${HUBMERGE_SPEC:?set HUBMERGE_SPEC to what pip should install, e.g. hubmerge==0.1.0}"
requirements="$(dirname "$0")/../requirements/hubmerge.txt"
torch_version=2.13.0
python -m pip install --progress-bar off --require-hashes -r "$requirements"
python -m pip install --progress-bar off --no-deps "torch==$torch_version" --index-url https://download.pytorch.org/whl/cpu
python -m pip install --progress-bar off --no-deps --no-build-isolation "$HUBMERGE_SPEC"
python -m pip check
hubmerge --version
