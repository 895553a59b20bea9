"""What produces the figures in docs/BENCHMARKS.md: `ragfan bench` (see bench.py)."""
