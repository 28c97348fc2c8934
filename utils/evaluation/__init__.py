"""Evaluation: the metrics (over arrays) and every figure."""
