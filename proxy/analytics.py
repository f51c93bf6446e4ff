"""The analytics interface (SQL, invoices, exports over usage) the admin API and CLI use; a
metering plugin provides it.

The core defines only this protocol and the typed key under which a plugin registers its
implementation in ``proxy.resources.Resources``; the core never imports a plugin.
"""

from __future__ import annotations

import csv
import datetime
import io
import os
from contextvars import ContextVar
from decimal import Decimal
from pathlib import Path, PurePosixPath
from typing import Any, Protocol

from proxy.context import StashKey

FRESH_AS_OF: ContextVar[float | None] = ContextVar("tollway_fresh_as_of", default=None)
"""Set by a backend's ``sql`` in the calling task: every row of a request that completed
before this Unix time is in the answer (``/admin/sql`` sends it as ``X-Tollway-Fresh-As-Of``).
A context variable, not a return value, so backends that do not know leave the protocol as is."""


class AnalyticsBackend(Protocol):
    async def sql(self, query: str) -> tuple[list[str], list[list[Any]]]:
        """Run read-only SQL on the usage database (after loading every pending row)."""

    async def invoice(self, user: str, month: str) -> dict[str, Any]:
        """The user's invoice for a calendar month (``YYYY-MM``, UTC)."""

    async def export_parquet(self, folder: str) -> tuple[str, int]:
        """Write the usage table as Parquet partitioned by day into ``folder``, a relative
        name under the configured export directory (``export_target``); returns the folder
        written (absolute) and the row count. Raises InvalidExportPath for any other name."""


class ReadOnlyQuery(Exception):
    """Raised by ``sql`` for anything but a read."""


class QueryError(Exception):
    """Raised by ``sql`` for a query the database rejects; the message is the database's.

    The backend translates its own errors into this, so the core (the admin API) needs no
    import of the database library: a chain without metering never loads DuckDB (~17 MB).
    """


class QueryTimeout(QueryError):
    """The query ran past the time limit and was interrupted."""


class ResultTooLarge(QueryError):
    """The answer has more rows or bytes than the limits allow."""


class QueryBusy(QueryError):
    """As many analytics queries as allowed are running; try again shortly (a QueryError, so
    a caller that shows what it can, like the dashboard, skips the figure)."""


class ShuttingDown(QueryError):
    """The process is shutting down: the call was stopped, or refused before it started."""


class InvalidExportPath(ValueError):
    """An export folder that is not a relative name under the export directory."""


ANALYTICS: StashKey[AnalyticsBackend] = StashKey()


def export_target(root: str | Path, name: str) -> Path:
    """The folder an export named ``name`` goes to: a relative name under ``root``, resolved.

    The admin API writes files as the gateway's user, so the name must not reach outside the
    export directory: absolute names, ``..`` parts and symlinks that lead out are refused, as
    is a name of an existing file (Parquet needs a folder).
    """
    if not name or "\x00" in name:
        raise InvalidExportPath("'dir' must be a non-empty folder name")
    rel = PurePosixPath(name)
    if rel.is_absolute() or name.startswith("~"):
        raise InvalidExportPath(
            "'dir' must be a folder name relative to the export directory (metering "
            "config export_dir), not an absolute path"
        )
    if ".." in rel.parts:
        raise InvalidExportPath("'dir' must not contain '..'")
    base = Path(os.path.realpath(root))
    target = Path(os.path.realpath(base / rel))  # follows symlinks: where files would land
    if target == base or not target.is_relative_to(base):
        raise InvalidExportPath("'dir' must name a folder inside the export directory")
    at = target
    while not at.exists():  # the nearest existing part of the path must be a folder
        at = at.parent
    if not at.is_dir():
        raise InvalidExportPath("'dir' names an existing file, not a folder")
    return target


def json_default(obj: object) -> object:
    """orjson's fallback for values DuckDB returns that JSON has no type for."""
    if isinstance(obj, Decimal):
        return str(obj)  # exact money, never a float
    if isinstance(obj, datetime.timedelta):
        return obj.total_seconds()
    return str(obj)


# A cell starting with one of these is a formula (or, with tab/CR, can become one) when the
# CSV is opened in a spreadsheet: OWASP's list for CSV injection.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _text(value: str) -> str:
    """A text cell a spreadsheet shows as text: a leading ``'`` neutralises a formula.

    Only text cells go through this. The money and count columns are numbers the invoice
    builds itself (a tier's ``prices`` override may be negative, a credit), and a ``'`` would
    turn ``-5.00`` into text that no longer sums. A lone character computes nothing, so the
    invoice's ``-`` (no feature) stays as it is.
    """
    return "'" + value if len(value) > 1 and value.startswith(_FORMULA_START) else value


def invoice_csv(invoice: dict[str, Any]) -> str:
    """The invoice as CSV: one row per line, then the total.

    The user, the feature (a client names it in ``X-Tollway-Feature``) and the texts built
    from them are tenant-controlled, so text cells are neutralised against formula injection.
    """
    user, month = _text(str(invoice["user"])), _text(str(invoice["month"]))
    out = io.StringIO()
    # RFC 4180's CRLF: the writer quotes a cell holding any character of the line terminator,
    # so a CR inside a user id cannot start a new row (whose first cell would escape _text)
    w = csv.writer(out, lineterminator="\r\n")
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
                user,
                month,
                _text(line["description"]),
                _text(line["service"]),
                _text(line["endpoint"] or ""),
                _text(line["feature"] or ""),
                line["quantity"],
                line["unit_price"],
                line["total"],
            ]
        )
    w.writerow([user, month, "Total", "", "", "", "", "", invoice["total"]])
    return out.getvalue()
