"""The benchmark harness: what Tollway costs on top of calling the provider directly.

The scripts are run as files (``python bench/run.py``, ``bench/cache_hit.py``,
``bench/instructions.py``, ``bench/writer.py``, ``bench/bare_proxy.py``); they import the
harness's modules as this package, and ``tests/procs.py`` imports ``bench.procs``, the one
helper that runs child processes for both. bench/README.md describes what is measured.
"""
