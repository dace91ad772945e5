"""Evaluation of a trained student: generate on held-out prompts, score, calibrate, report."""
