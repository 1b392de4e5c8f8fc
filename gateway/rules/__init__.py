"""Routing rules: the expression language, study completion and dispatch decisions."""
