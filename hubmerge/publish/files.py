"""The names of the files in a model folder: what hubmerge writes into an output folder, and reads from a
source's. Every module names these files through the constants here, never by a literal.

| file | written by | what |
|---|---|---|
| `config.json` | api | the merged model's config |
| `model.safetensors`, or `model-00001-of-0000N.safetensors` and `model.safetensors.index.json` | engine | the merged weights |
| `hubmerge.toml` | api | the recipe, as written |
| `README.md` | api | the model card |
| `hubmerge.lock.json` | lock | sources, revisions, sha256 of every file |
| `merge_stats.json` and its plots | diagnostics | the merge diagnostics |
| `eval_results.json`, `eval_results.png` | evaluate | the evaluation |
| `.hubmerge-deferred.tmp` | engine | scratch: positions a method leaves open until the last shard |
"""

from __future__ import annotations

__all__ = [
    "CARD_FILE",
    "CHART_FILE",
    "CONFIG_FILE",
    "INDEX_FILE",
    "LOCK_FILE",
    "RECIPE_COPY",
    "RESULTS_FILE",
    "SCRATCH_FILE",
    "SINGLE_FILE",
    "STATS_FILE",
    "STATS_PLOTS",
    "shard_file",
]

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"  # the weights in one file
INDEX_FILE = "model.safetensors.index.json"  # which shard holds which tensor, when there are several
CARD_FILE = "README.md"
RECIPE_COPY = "hubmerge.toml"  # the recipe, as written, beside the weights
LOCK_FILE = "hubmerge.lock.json"
STATS_FILE = "merge_stats.json"
STATS_PLOTS = {  # chart -> (file, title)
    "norms": ("merge_stats_norms.png", "Task-vector norm per layer"),
    "cosine": ("merge_stats_cosine.png", "Cosine similarity between task vectors per layer"),
    "signs": ("merge_stats_signs.png", "Sign conflicts per layer"),
}
RESULTS_FILE = "eval_results.json"
CHART_FILE = "eval_results.png"
# Where the positions a method leaves open wait for the last shard (`engine._Patches`).
SCRATCH_FILE = ".hubmerge-deferred.tmp"


def shard_file(number: int, count: int) -> str:
    """The name of shard `number` (1-based) of `count`, as transformers names them."""
    return f"model-{number:05d}-of-{count:05d}.safetensors"
