"""Benchmarks, run from the repo root as `python -m bench.bench_<topic>`; they print Markdown."""
