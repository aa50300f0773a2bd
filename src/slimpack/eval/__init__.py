"""Evaluations of trained models: what a run learned about its context (loss by position, needles)."""
