"""Benchmarks of the inference app (not part of the test suite). Run each as a module from the repository root,
e.g. `python -m bench.concurrency`; each prints a table and writes its numbers as JSON next to the script."""
