"""Benchmarks: speed and quality figures measured side by side in one run."""
