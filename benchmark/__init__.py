"""Benchmark scripts: each prints a table and writes JSON (and plots) under benchmark/results/."""
