"""Analyses computed from the codebase's own configs and model (no separate formulas)."""
