"""The ``limits`` plugin: tiers' features, monthly quotas, rate limits, the admission queue.

- ``plugin``: the hooks and the config model (``LimitsConfig``); its docstring is the reference.
- ``quota``: monthly request counts (the ``Quota`` interface), in memory with a file or on Redis.
- ``windows``: the rate-limit windows (the ``Windows`` interface), in memory or on Redis.
- ``admission``: the global concurrency cap and its priority queue.
"""
