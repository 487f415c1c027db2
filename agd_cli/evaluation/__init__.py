"""Scoring images: the mnist digit evaluator and pixel metrics."""
