"""budgets: monthly money budgets per user and per key (``plugins.budgets.plugin``)."""
