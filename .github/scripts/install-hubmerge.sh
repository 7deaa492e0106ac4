#!/usr/bin/env bash
# Install hubmerge ($HUBMERGE_SPEC: a pip requirement or a source folder) into the current `python`,
# with the CPU build of PyTorch first: runners have no GPU, and the default torch wheel brings several
# GB of CUDA libraries.
set -euo pipefail
: "${HUBMERGE_SPEC:?set HUBMERGE_SPEC to what pip should install, e.g. hubmerge==0.1.0}"
python -m pip install --progress-bar off torch --index-url https://download.pytorch.org/whl/cpu
python -m pip install --progress-bar off "$HUBMERGE_SPEC"
hubmerge --version
