#!/usr/bin/env bash
# Install what `hubmerge search` needs beside hubmerge (the `search` extra: Optuna, cmaes for its CMA-ES
# sampler, scikit-learn for the fANOVA importance), pinned. Only search.yml's search job runs it: it holds no
# token and cannot write to the repository, and what it makes reaches the Hub only through a reviewed pull
# request.
set -euo pipefail
python -m pip install --progress-bar off "optuna==5.1.0" "cmaes==0.13.1" "scikit-learn==1.9.1"
python -c 'import optuna, cmaes, sklearn'
