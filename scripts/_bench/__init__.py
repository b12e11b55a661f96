"""Pieces of scripts/bench_vs_ort.py (rows and data, measured quantize steps, evaluation, report)."""
