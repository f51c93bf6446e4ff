"""The ``metering`` plugin: one usage row per request into DuckDB, SQL, views and invoices.

- ``plugin``: the hooks, the config model (``MeteringConfig``) and the usage store; its
  docstring holds the billing rules.
- ``spool``: the crash-safe memory-mapped spool rows go to first.
- ``database``: the DuckDB schema, migrations, views, loads and the admin SQL sandbox.
- ``stream``: several instances: rows through a Redis stream into ``tollway meter``.
- ``analytics``: admin SQL, invoices and exports on threads of their own, with limits.
- ``billing``: overage past the monthly quota and the prorated subscription (invoices).
- ``ip_hash``: the keyed hash stored instead of client addresses.
- ``figures``: the dashboard's business cards and top users (``dashboard_figures``).
- ``cli``: ``tollway meter`` and the data commands' ``--db`` (``register_commands``);
  ``meter``: the ``tollway meter`` server, imported only when it runs.
"""
