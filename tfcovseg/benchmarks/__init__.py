"""Benchmarks on real data (``python -m tfcovseg.benchmarks.semiseg``)."""
