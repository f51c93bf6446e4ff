"""Issue 11, item 10: a stream whose provider dies mid-way is neither a clean finish nor billed.

The client has already received a 200 and part of the reply when the provider fails, so the
gateway ends the stream with a provider-shaped error event, and the usage row records the
failure (``error_code = 'upstream_stream_error'``, the failure's status) with no per-request
price, while the provider cost of the tokens produced is kept (estimated where the provider's
counts never arrived). A complete stream is still priced as before.
"""

from __future__ import annotations

import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest

from tests.conftest import ADMIN_KEY, BASE_POLICY, Gw, policy

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
MSG = [{"role": "user", "content": "tell me a long story about a gateway"}]
FEATURE = {"X-Tollway-Feature": "basic_suggestions"}  # price_per_request 0.01 in BASE_POLICY
WORDS = {"x-emulator-words": "30"}
# a read timeout short enough for a test, long enough for a busy machine's first byte
SHORT_READ = policy(providers={"openai": {"timeout": {"read": "700ms"}}})


def chain(db: Path) -> str:
    return (
        "chain:\n  - name: auth\n"
        f"  - name: metering\n    config: {{database: {db}, flush_interval: 50ms}}\n"
    )


async def rows(gw: Gw, user: str) -> list[dict[str, Any]]:
    async with gw.http.post(
        f"{gw.url}/admin/sql",
        json={
            "query": "SELECT stream, status, error_code, price_usd, cost_usd, usage_estimated, "
            f"input_tokens, output_tokens FROM usage WHERE user_id = '{user}' ORDER BY ts"
        },
        headers=ADMIN,
    ) as r:
        assert r.status == 200, await r.text()
        res = await r.json()
    return [dict(zip(res["columns"], row, strict=True)) for row in res["rows"]]


async def openai_stream(client: openai.AsyncOpenAI, headers: dict[str, str]) -> list[Any]:
    """The chunks an SDK stream delivered before it ended (raises what the SDK raises)."""
    got: list[Any] = []
    stream = await client.chat.completions.create(
        model="gpt-5.4-mini",
        messages=MSG,  # type: ignore[arg-type]
        stream=True,
        extra_headers={**FEATURE, **WORDS, **headers},
    )
    async for chunk in stream:
        got.append(chunk)
    return got


def assert_failed_and_unpriced(row: dict[str, Any], status: int) -> None:
    assert row["stream"] is True
    assert row["status"] == status  # not the 200 the client first received
    assert row["error_code"] == "upstream_stream_error"
    assert Decimal(str(row["price_usd"])) == 0
    # the provider produced tokens before it died: their cost is kept, estimated
    assert row["usage_estimated"] is True
    assert row["output_tokens"] > 0 and row["input_tokens"] > 0
    assert Decimal(str(row["cost_usd"])) > 0


@pytest.mark.parametrize(
    ("base", "control", "status"),
    [
        # the provider's connection drops after three events
        (BASE_POLICY, {"x-emulator-stream-abort-after": "3"}, 502),
        # the provider stalls after its first event, past the read timeout
        (SHORT_READ, {"x-emulator-chunk-delay-ms": "3000"}, 504),
        # the body ends properly but before the provider's terminal event
        (BASE_POLICY, {"x-emulator-stream-stop-after": "4"}, 502),
    ],
    ids=["connection-dropped", "read-timeout", "ended-early"],
)
async def test_a_broken_openai_stream_is_an_error_and_not_priced(
    make_gateway: Any, tmp_path: Path, base: Any, control: dict[str, str], status: int
) -> None:
    assert SHORT_READ != policy()
    gw: Gw = await make_gateway(chain(tmp_path / "usage.duckdb"), base=base)
    client = gw.openai(await gw.create_key("broken", "pro"))
    got: list[Any] = []
    with pytest.raises(openai.APIError) as info:
        stream = await client.chat.completions.create(
            model="gpt-5.4-mini",
            messages=MSG,  # type: ignore[arg-type]
            stream=True,
            extra_headers={**FEATURE, **WORDS, **control},
        )
        async for chunk in stream:
            got.append(chunk)
    # the stream really started (the client had part of the reply) and never finished
    assert got and got[0].choices[0].delta.role == "assistant"
    assert not any(c.choices and c.choices[0].finish_reason for c in got)
    assert info.value.code == "upstream_stream_error"
    (row,) = await rows(gw, "broken")
    assert_failed_and_unpriced(row, status)
    assert await billed_requests(gw, "broken") == 0


async def test_a_broken_anthropic_stream_is_an_error_and_not_priced(
    make_gateway: Any, tmp_path: Path
) -> None:
    gw: Gw = await make_gateway(chain(tmp_path / "usage.duckdb"))
    client = gw.anthropic(await gw.create_key("broken", "pro"))
    seen: list[str] = []
    with pytest.raises(anthropic.APIError):
        async with client.messages.stream(
            model="claude-sonnet",
            max_tokens=200,
            messages=[{"role": "user", "content": "tell me a long story"}],
            extra_headers={**FEATURE, **WORDS, "x-emulator-stream-abort-after": "6"},
        ) as stream:
            async for event in stream:
                seen.append(event.type)
    assert "message_start" in seen and "message_stop" not in seen
    (row,) = await rows(gw, "broken")
    assert_failed_and_unpriced(row, 502)


async def test_a_complete_stream_is_still_priced(make_gateway: Any, tmp_path: Path) -> None:
    gw: Gw = await make_gateway(chain(tmp_path / "usage.duckdb"))
    client = gw.openai(await gw.create_key("whole", "pro"))
    got = await openai_stream(client, {"x-emulator-chunk-delay-ms": "5"})
    assert [c.choices[0].finish_reason for c in got if c.choices][-1] == "stop"
    (row,) = await rows(gw, "whole")
    assert row["status"] == 200 and row["error_code"] is None
    assert Decimal(str(row["price_usd"])) == Decimal("0.01")
    assert row["usage_estimated"] is False
    assert row["output_tokens"] == 30  # the provider's own count (x-emulator-words)
    assert Decimal(str(row["cost_usd"])) > 0
    assert await billed_requests(gw, "whole") == 1


async def billed_requests(gw: Gw, user: str) -> int:
    """How many requests the user's invoice for this month bills."""
    month = datetime.datetime.now(datetime.UTC).strftime("%Y-%m")
    async with gw.http.get(
        f"{gw.url}/admin/invoices/{user}", params={"month": month}, headers=ADMIN
    ) as r:
        assert r.status == 200, await r.text()
        lines = (await r.json())["lines"]
    return sum(line["quantity"] for line in lines if line["service"] == "ai_api")
