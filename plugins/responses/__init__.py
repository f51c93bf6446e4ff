"""The ``responses`` plugin: the Responses API's stored responses, per tenant, encrypted.

- ``plugin``: the hooks and the config model (``ResponsesConfig``); its docstring is the
  reference (what is recorded, when a conversation is expanded).
- ``store``: sealed records (``proxy.sealing``), reads that tell "absent" from "unreachable".
- ``backend``: where records live: in process (bounded, LRU) or Redis (``state.url``).
- ``conversation``: a stored conversation rebuilt for a request that continues it.
- ``routes``: ``GET``/``DELETE /v1/responses/{id}`` and ``.../input_items``.
"""
