"""Other tools' formats: mergekit's YAML configs."""
