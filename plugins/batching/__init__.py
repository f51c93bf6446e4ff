"""The ``batching`` plugin: fewer provider calls for the same work. Its chain name says
batching; it holds coalescing too, because both take over the provider call in
``send_upstream`` under one tenant rule (one ``scope``, identical forwarded headers).

- ``plugin``: the hooks and the config model (``BatchingConfig``); its docstring is the
  reference.
- ``coalesce``: single flight of identical requests (a whole reply inline, a stream in a task
  its subscribers follow).
- ``embeddings``: small embeddings requests merged into one call within a window, each caller
  given its own vectors and share of the usage.
"""
