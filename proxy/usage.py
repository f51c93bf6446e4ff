"""The usage interface the admin API and CLI use; a metering plugin provides it.

The core defines only this protocol and the typed key under which a plugin registers its
implementation in ``proxy.shared.Shared``; the core never imports a plugin.
"""

from __future__ import annotations

import csv
import io
from typing import Any, Protocol

from proxy.context import StashKey


class UsageBackend(Protocol):
    async def sql(self, query: str) -> tuple[list[str], list[list[Any]]]:
        """Run read-only SQL on the usage database (after loading every pending row)."""

    async def invoice(self, user: str, month: str) -> dict[str, Any]:
        """The user's invoice for a calendar month (``YYYY-MM``, UTC)."""

    async def export_parquet(self, folder: str) -> int:
        """Write the usage table as Parquet partitioned by day; returns the row count."""


class ReadOnlyQuery(Exception):
    """Raised by ``sql`` for anything but a read."""


class QueryError(Exception):
    """Raised by ``sql`` for a query the database rejects; the message is the database's.

    The backend translates its own errors into this, so the core (the admin API) needs no
    import of the database library: a chain without metering never loads DuckDB (~17 MB).
    """


USAGE: StashKey[UsageBackend] = StashKey()


def invoice_csv(invoice: dict[str, Any]) -> str:
    """The invoice as CSV: one row per line, then the total."""
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(
        [
            "user",
            "month",
            "description",
            "service",
            "endpoint",
            "feature",
            "quantity",
            "unit_price",
            "total",
        ]
    )
    for line in invoice["lines"]:
        w.writerow(
            [
                invoice["user"],
                invoice["month"],
                line["description"],
                line["service"],
                line["endpoint"] or "",
                line["feature"] or "",
                line["quantity"],
                line["unit_price"],
                line["total"],
            ]
        )
    w.writerow([invoice["user"], invoice["month"], "Total", "", "", "", "", "", invoice["total"]])
    return out.getvalue()
