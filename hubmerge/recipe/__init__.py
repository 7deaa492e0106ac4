"""The recipe: the TOML file's schema (schema.py), model references (reference.py), its loading into a frozen
`Recipe` (load.py), and the recipe TOML that hubmerge writes (write.py)."""
