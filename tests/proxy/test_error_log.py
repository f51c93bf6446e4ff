"""Errors that repeat on every request are logged once with a traceback, then counted.

A plugin whose ``log`` hook fails on every request stands for an outage; the gateway must
keep answering, log the first failure with its traceback and afterwards one line per
interval that says how many failures it did not log.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from proxy.context import RequestContext
from proxy.failurelog import ErrorLog
from proxy.handler import ERRORS
from proxy.hookspecs import hookimpl

CHAT = {"model": "gpt-5.4-mini", "messages": [{"role": "user", "content": "hi"}]}


class LedgerDown(Exception):
    pass


class FlakyLog:
    def __init__(self, config: Any, policy: Any) -> None:
        pass

    @hookimpl
    async def log(self, ctx: RequestContext) -> None:
        raise LedgerDown("ledger unreachable")


def lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if "log hook of plugin flaky_log failed" in r.getMessage()]


async def test_a_failing_log_hook_is_logged_once_then_counted(
    make_gateway: Any, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    gw = await make_gateway(
        "chain:\n  - name: auth\n  - name: flaky_log\n", extra_plugins={"flaky_log": FlakyLog}
    )
    key = await gw.create_key()
    caplog.set_level(logging.ERROR, logger="tollway")
    monkeypatch.setattr(ERRORS, "every", 1.0)

    async def post() -> None:
        async with gw.http.post(
            f"{gw.url}/v1/chat/completions", json=CHAT, headers={"Authorization": f"Bearer {key}"}
        ) as r:
            assert r.status == 200

    for _ in range(30):
        await post()
    [first] = lines(caplog)
    assert first.exc_info is not None and first.exc_info[0] is LedgerDown
    await asyncio.sleep(1.2)
    await post()
    first_again, second = lines(caplog)
    assert first_again is first
    assert second.exc_info is None
    assert "LedgerDown again (29 more since the last line" in second.getMessage()


def test_a_new_kind_gets_its_traceback_within_the_interval() -> None:
    logger = logging.getLogger("tollway.test.errorlog")
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger.addHandler(handler)
    try:
        errors = ErrorLog(logger, every=60)
        for exc in (KeyError("a"), KeyError("b"), ValueError("c"), KeyError("d")):
            try:
                raise exc
            except Exception:
                errors.exception("p", "failed for %s", "req")
        try:
            raise KeyError("e")
        except Exception:
            errors.exception("other plugin", "failed for %s", "req")
    finally:
        logger.removeHandler(handler)
    assert [r.exc_info[0] if r.exc_info else None for r in records] == [
        KeyError,
        ValueError,
        KeyError,
    ]
    assert errors.kinds[("p", "KeyError")][1] == 2
