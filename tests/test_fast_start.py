"""Fast start: the commands that read no weights load neither torch nor transformers, and `import hubmerge`
loads neither the recipe model (pydantic) nor the mergekit importer. Each case runs in a fresh interpreter,
the only place that shows what a command imports."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from support.checkpoints import REPO, TINY

HEAVY = ("torch", "transformers", "safetensors")
RECIPE = REPO / "recipes" / "examples" / "tiny-ties.toml"


def loaded_after(code: str) -> tuple[list[str], str]:
    """The modules of interest loaded after `code` runs in a new interpreter, and what it printed."""
    script = (
        "import json, sys\n"
        f"{code}\n"
        "names = ('torch', 'transformers', 'safetensors', 'pydantic', 'yaml', 'hubmerge.interop.mergekit')\n"
        "print('\\nloaded:', json.dumps(sorted(m for m in names if m in sys.modules)))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    output, _, loaded = result.stdout.rpartition("\nloaded: ")
    return json.loads(loaded), output


@pytest.mark.parametrize(
    "argv",
    [["--version"], ["--help"], ["plan", "--help"], ["validate", str(RECIPE)]],
    ids=["version", "help", "plan-help", "validate"],
)
def test_commands_that_read_no_weights_import_neither_torch_nor_transformers(argv: list[str]) -> None:
    # `python -m hubmerge ARGS`, run as the module's __main__, with the exit caught so the check can follow.
    code = (
        "import runpy\n"
        f"sys.argv = ['hubmerge', *{argv!r}]\n"
        "try:\n"
        "    runpy.run_module('hubmerge', run_name='__main__', alter_sys=True)\n"
        "except SystemExit as exit:\n"
        "    assert exit.code in (0, None), exit.code\n"
    )
    loaded, output = loaded_after(code)
    assert not [m for m in loaded if m in HEAVY], loaded
    expected = {"--version": "hubmerge 0.1.0", "--help": "usage: hubmerge", "plan": "usage: hubmerge plan"}
    assert output.startswith(expected.get(argv[0], f"ok  {RECIPE}"))


@pytest.mark.slow
def test_import_hubmerge_loads_no_recipe_model_and_no_mergekit_importer_until_used() -> None:
    loaded, _ = loaded_after("import hubmerge")
    assert loaded == []
    loaded, output = loaded_after(
        f"import hubmerge\nprint(hubmerge.load_recipe({str(TINY.parent / 'tiny-ties.toml')!r}).method.name)"
    )
    assert output.strip() == "ties"
    assert "pydantic" in loaded and "torch" not in loaded
