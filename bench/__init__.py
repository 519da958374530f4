"""Benchmarks of nerv-cluster against its peers (Celery canvas, raw Celery, Dask distributed) in one run.

``python -m bench --help``. Shapes live in ``bench.shapes``, the engine interface in ``bench.engines``.
"""
