"""Benchmarks that write results: run each from the repository root as ``python -m benchmarks.NAME``
(``--help`` says what it measures); results and plots go to ``benchmarks/results/``."""
