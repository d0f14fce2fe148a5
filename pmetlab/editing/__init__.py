"""Locate-then-edit: context prefixes, target optimisation, key/residual/solve, reversible deltas."""
