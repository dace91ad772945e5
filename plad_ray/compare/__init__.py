"""Comparing objectives on one task: which objective, at which learning rate, and how sure (stats)."""
