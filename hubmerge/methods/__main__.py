"""`python -m hubmerge.methods [README.md] [--check]`: rewrite the README's merge-method table from the registry.

With `--check`, write nothing and exit 1 when the table is out of date.
"""

from __future__ import annotations

import sys
from pathlib import Path

from . import update_readme


def main(argv: list[str]) -> int:
    check = "--check" in argv
    paths = [a for a in argv if a != "--check"]
    path = Path(paths[0] if paths else "README.md")
    text = path.read_text(encoding="utf-8")
    updated = update_readme(text)
    if updated == text:
        return 0
    if check:
        print(f"{path}: the merge-method table is out of date; run python -m hubmerge.methods {path}")
        return 1
    path.write_text(updated, encoding="utf-8")
    print(f"{path}: merge-method table updated")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
