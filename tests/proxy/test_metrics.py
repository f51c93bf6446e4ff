"""GET /metrics: Prometheus text with the core counters and every plugin's numbers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

MSG = [{"role": "user", "content": "measure me"}]


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


async def test_metrics_exposes_core_and_plugins(make_gateway: Any, tmp_path: Path) -> None:
    gw = await make_gateway(
        "chain:\n  - name: auth\n  - name: limits\n    config: {global: {concurrent_requests: 4}}\n"
        "  - name: cache\n    config: {default_ttl: 1h}\n  - name: batching\n"
        f"  - name: metering\n    config: {{database: {tmp_path}/u.duckdb}}\n"
    )
    key = await gw.create_key("mo", "pro")
    client = gw.openai(key)
    for _ in range(3):
        await client.chat.completions.create(model="gpt-5.4-mini", messages=MSG)  # type: ignore[arg-type]
    async with gw.http.post(f"{gw.url}/v1/chat/completions", json={"model": "x"}) as r:
        assert r.status == 401
    async with gw.http.get(f"{gw.url}/metrics") as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain")
        text = await r.text()
    got = samples(text)
    assert (
        got[
            ("tollway_requests_total", (("cache", "miss"), ("endpoint", "chat"), ("status", "200")))
        ]
        == 1
    )
    assert (
        got[("tollway_requests_total", (("cache", "hit"), ("endpoint", "chat"), ("status", "200")))]
        == 2
    )
    assert (
        got[("tollway_requests_total", (("cache", ""), ("endpoint", "chat"), ("status", "401")))]
        == 1
    )
    assert got[("tollway_cache_hits_total", ())] == 2
    assert got[("tollway_cache_entries", ())] == 1
    assert got[("tollway_upstream_in_flight", ())] == 0
    assert got[("tollway_admission_queue_length", ())] == 0
    assert got[("tollway_coalesced_requests_total", ())] == 0
    assert got[("tollway_usage_rows_spooled_total", ())] >= 4
    assert got[("tollway_requests_in_flight", ())] == 0  # a scrape is not a client request
    assert key not in text
