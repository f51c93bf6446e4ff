"""The ``cache`` plugin: exact answers per tenant, encrypted at rest, replayed as streams.

- ``plugin``: the hooks and the config model (``CacheConfig``); its docstring is the reference.
- ``store``: the encrypted store (fails open, counts), and the cross-instance flight lock.
- ``backend``: the storage interface the store uses (``CacheBackend``), chosen once by URL;
  ``memory`` (in process, bounded LRU) and ``redis_backend`` (aiocache's ``RedisCache``) are
  its two implementations.
- ``replay``: one canonical stored body replayed as a whole reply or as an SSE stream.
"""
