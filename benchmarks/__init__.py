"""alexprep's benchmarks, each runnable as `python -m benchmarks.<name>` from the repository root."""
