"""The recipe: the TOML file's schema, and its loading into a frozen `Recipe`."""
