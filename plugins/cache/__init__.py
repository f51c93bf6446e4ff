"""The ``cache`` plugin: exact answers per tenant, encrypted at rest, replayed as streams.

- ``plugin``: the hooks and the config model (``CacheConfig``); its docstring is the reference.
- ``store``: the encrypted store over a memory or a Redis backend, and the cross-instance
  flight lock.
- ``aiocache_base``: the aiocache backend base the store builds on.
- ``replay``: one canonical stored body replayed as a whole reply or as an SSE stream.
"""
