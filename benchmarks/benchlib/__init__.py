"""Shared machinery of jasper's benchmark suite: grid, dataset cache, measurements, report.

The pytest-benchmark modules (``bench_*.py``) and ``run.py`` import this package; nothing here is
part of the published jasper packages.
"""
