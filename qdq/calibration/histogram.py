"""Histogram calculators (percentile, entropy, mse) — filled in by issue 4."""
