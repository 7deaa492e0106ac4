"""`hubmerge search`: find a recipe's values with an objective in the loop (pip install "hubmerge[search]").

space.py: the `[search]` table as a typed `SearchSpec` and a trial's values in the recipe; document.py: the
recipe as a TOML document written elsewhere (a trial's recipe, best.toml); objective.py: what a trial
scores (in stages, for the pruner); run.py: the study, the trials (here or as Ray tasks) and what a search
leaves; publish.py: `--publish best`, best.toml merged and pushed with a card section on the search. The
entry point is `hubmerge.search.run.search`; nothing here is imported by a plain merge but space.py (schema checks).
"""
