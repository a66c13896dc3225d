"""Benchmarks: each script measures one claim against the obvious alternative on the same machine (bench/README.md)."""
