"""The speed benchmark: bench/run_bench.py runs the sections (one module each)
and writes BENCHMARKS.md through bench/render.py."""
