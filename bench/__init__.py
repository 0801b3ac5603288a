"""Benchmark: this pipeline and the published balaitous 1.2 package, side by side (README.md)."""
