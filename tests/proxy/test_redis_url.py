"""A ``state.url`` with the cache's ``?timeout=`` works for every Redis client of the gateway
(redis-py raised ``TypeError`` for it in the key sync, the state watch and the limits)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from proxy.redisurl import redis_url as normal
from tests.conftest import policy


def test_timeout_is_spelled_as_redis_py_reads_it() -> None:
    assert normal("redis://h:1/0?timeout=1") == "redis://h:1/0?socket_timeout=1"
    assert normal("redis://h/0?timeout=1&socket_timeout=2") == "redis://h/0?socket_timeout=2"
    assert normal("redis://h/0?socket_connect_timeout=3") == "redis://h/0?socket_connect_timeout=3"
    assert normal("redis://:pw@h/2") == "redis://:pw@h/2"


async def test_a_state_url_with_timeout_serves(
    make_gateway: Any, redis_url: str, tmp_path: Path
) -> None:
    url = f"{redis_url}?timeout=2"
    chain = [
        {"name": "auth"},
        {"name": "limits", "config": {"user": ["100/minute"]}},
        {"name": "budgets"},
        {"name": "metering", "config": {"database": str(tmp_path / "usage.duckdb")}},
    ]
    gw = await make_gateway(chain, base=policy(state={"url": url, "dir": tmp_path}))
    client = gw.openai(await gw.create_key("ann", "pro"))
    reply = await client.chat.completions.with_raw_response.create(
        model="gpt-5.4-mini", messages=[{"role": "user", "content": "hi"}]
    )
    assert reply.http_response.status_code == 200
    assert reply.headers["x-ratelimit-remaining-requests"] is not None
