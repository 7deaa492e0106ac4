"""Checks of a merged model: the sanity gate, the forward pass, evaluation, diagnostics and their plots."""
