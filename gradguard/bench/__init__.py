"""Benchmark cases and the `python -m gradguard.bench` report."""
