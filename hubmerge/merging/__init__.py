"""The merge: the plan computed before any download, the engine that streams it, and the methods."""
