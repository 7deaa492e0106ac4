"""Helpers shared by the test modules (no test module imports another): the in-process CLI runner and
the local Hub's users, pool and environment."""
