"""Execution backends for nnterp."""
