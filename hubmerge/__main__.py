"""`python -m hubmerge ...`: the `hubmerge` command."""

import sys

from .cli import main

sys.exit(main())
