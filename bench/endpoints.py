"""The Responses API's cost next to chat completions, in the same run (``bench/run.py``).

``POST /v1/responses`` reaches a model two ways: passed through to an OpenAI provider that
serves the Responses API (``gpt-5.4-mini``), or translated to chat and on to Anthropic's
Messages for a Claude model (``claude-sonnet``), and back into a Response. Each is measured
next to a chat completion on the same full gateway, in rounds that alternate all of them, and
each against its own floor: the provider call the gateway makes, sent straight to the emulator
(``/v1/responses`` for the pass-through, ``/v1/messages`` for the translated route). So the
overhead of a row is what the gateway adds to that call, translation included.

Measured per row: c=1 latency (wrk, direct and through the gateway, alternating) and the
gateway's c=32 throughput with its CPU per request (all threads, as the main table counts it).
Every request is distinct, as in the main runs. Writes ``report["endpoints"]``; rendered by
``render_endpoints``.
"""

from __future__ import annotations

import json
import secrets
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from bench.load import CHAT, MODEL, SMALL_BODY, http, run_wrk, write_lua
from bench.measure import Settings, Target, combine, throughput_round
from bench.procs import BenchError

PROMPT = SMALL_BODY["messages"][0]["content"] + " %s-%d-%d"
CLAUDE, CLAUDE_UPSTREAM = "claude-sonnet", "claude-sonnet-5"  # as policies.yaml names them


@dataclass(frozen=True, slots=True)
class Row:
    """One kind of request: what the client sends the gateway, and the provider call it makes
    (the direct floor)."""

    name: str
    label: str
    gateway_path: str
    gateway_body: dict[str, Any]
    direct_path: str
    direct_body: dict[str, Any]


ROWS = (
    Row(
        "chat",
        f"chat completions, {MODEL} (passed through)",
        CHAT,
        {**SMALL_BODY, "messages": [{"role": "user", "content": PROMPT}]},
        CHAT,
        {**SMALL_BODY, "messages": [{"role": "user", "content": PROMPT}]},
    ),
    Row(
        "responses_native",
        f"Responses, {MODEL} (passed through to /v1/responses)",
        "/v1/responses",
        {"model": MODEL, "input": PROMPT, "max_output_tokens": 16},
        "/v1/responses",
        {"model": MODEL, "input": PROMPT, "max_output_tokens": 16},
    ),
    Row(
        "responses_translated",
        f"Responses, {CLAUDE} (translated to /v1/messages)",
        "/v1/responses",
        {"model": CLAUDE, "input": PROMPT, "max_output_tokens": 16},
        "/v1/messages",
        {
            "model": CLAUDE_UPSTREAM,
            "max_tokens": 16,
            "messages": [{"role": "user", "content": PROMPT}],
        },
    ),
)


Run = tuple[Target, Path]
"""A target and the wrk script that loads it."""


def _targets(
    gateway: Target, emu: str, key: str, tmp: Path
) -> tuple[dict[str, Run], dict[str, Run]]:
    """Per row: (direct target, its wrk script) and (gateway target, its wrk script)."""
    direct: dict[str, Run] = {}
    through: dict[str, Run] = {}
    for row in ROWS:
        d_lua, g_lua = tmp / f"{row.name}-direct.lua", tmp / f"{row.name}-gateway.lua"
        write_lua(d_lua, key, row.direct_body)
        write_lua(g_lua, key, row.gateway_body)
        direct[row.name] = (Target(f"direct {row.name}", emu, None, path=row.direct_path), d_lua)
        through[row.name] = (replace(gateway, name=row.name, path=row.gateway_path), g_lua)
    return direct, through


def _rotated(runs: list[Run], k: int) -> list[Run]:
    """Round k starts at a different run, so none always goes first or last."""
    k %= len(runs)
    return runs[k:] + runs[:k]


def _sanity(target: Target, body: dict[str, Any], key: str) -> None:
    """One request, its reply checked for the shape of its endpoint (never timed)."""
    tag = f"sanity-{secrets.token_hex(4)}"
    sent = json.loads(json.dumps(body).replace("%s-%d-%d", tag))
    reply = http("POST", target.url, sent, {"Authorization": f"Bearer {key}"})
    if not (reply.get("choices") or reply.get("output") or reply.get("content")):
        raise BenchError(f"{target.name} ({target.path}): unexpected reply {reply}")


def measure_endpoints(
    gateway: Target, emu: str, emu_pid: int, key: str, tmp: Path, settings: Settings
) -> dict[str, Any]:
    """c=1 latency (direct and gateway per row, every run alternating), then the gateway's c=32
    throughput and CPU per row, alternating the rows."""
    direct, through = _targets(gateway, emu, key, tmp)
    pairs = [*direct.values(), *through.values()]
    for row in ROWS:
        _sanity(direct[row.name][0], row.direct_body, key)
        _sanity(through[row.name][0], row.gateway_body, key)
    for target, lua in pairs:
        run_wrk(target.url, lua, 2, 32, 1)  # warm pools and caches of this request's path
    print("  /v1/responses vs chat: latency at c=1 ...", file=sys.stderr, flush=True)
    seconds = max(1, round(settings.latency_s / settings.rounds))
    latency: dict[str, list[dict[str, Any]]] = {t.name: [] for t, _ in pairs}
    for k in range(settings.rounds):
        for target, lua in _rotated(pairs, k):
            latency[target.name].append(run_wrk(target.url, lua, 1, 1, seconds))
    print("  /v1/responses vs chat: throughput at c=32 ...", file=sys.stderr, flush=True)
    rounds = settings.throughput_rounds
    seconds = max(1, round(settings.throughput_s / rounds))
    throughput: dict[str, list[dict[str, Any]]] = {row.name: [] for row in ROWS}
    gateways = list(through.values())
    for k in range(rounds):
        for target, lua in _rotated(gateways, k):
            throughput[target.name].append(throughput_round(target, emu, emu_pid, lua, seconds))
    out: dict[str, Any] = {}
    for row in ROWS:
        d, g = direct[row.name][0], through[row.name][0]
        out[row.name] = {
            "label": row.label,
            "gateway_path": row.gateway_path,
            "direct_path": row.direct_path,
            "direct_c1": combine(latency[d.name]),
            "gateway_c1": combine(latency[g.name]),
            "gateway_c32": combine(throughput[row.name]),
        }
    return out


def render_endpoints(r: dict[str, Any]) -> list[str]:
    """The table of ``report["endpoints"]`` (nothing when the phase did not run)."""
    e = r.get("endpoints")
    if not e:
        return []
    s = r["settings"]
    lines = [
        "",
        "## /v1/responses next to chat completions",
        "",
        "The full gateway, one kind of request per row, in the same run (`bench/endpoints.py`). "
        "*Direct* is the provider call the gateway makes for that request, sent straight to the "
        "emulator (`/v1/responses` for the pass-through, `/v1/messages` for the translated "
        "route), so *overhead* is what the gateway adds, translation included. c=1: wrk -t1 "
        f"-c1, {s['rounds']} alternating rounds of all six runs (median of the rounds' "
        f"percentiles); c=32: wrk -t2 -c32 on the gateway, {s['throughput_rounds']} rounds "
        "alternating the rows; CPU: the gateway process (all threads) per request. Every "
        "request distinct.",
        "",
        "| request (gateway → provider) | direct p50 (ms) | gateway p50 (ms) | overhead p50 "
        "(ms) | overhead p99 (ms) | gateway CPU µs/req, c=32 | gateway req/s, c=32 |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    chat_cpu = e["chat"]["gateway_c32"].get("proxy_cpu_us_per_request")
    for name, x in e.items():
        d, g = x["direct_c1"]["latency_us"], x["gateway_c1"]["latency_us"]
        tp = x["gateway_c32"]
        cpu = tp.get("proxy_cpu_us_per_request")
        vs = "" if name == "chat" or not cpu or not chat_cpu else f" ({cpu / chat_cpu:.2f}x chat)"
        lines.append(
            f"| {x['label']}: {x['gateway_path']} → {x['direct_path']} "
            f"| {d['p50'] / 1000:.3f} | {g['p50'] / 1000:.3f} "
            f"| {(g['p50'] - d['p50']) / 1000:+.3f} | {(g['p99'] - d['p99']) / 1000:+.3f} "
            f"| {'-' if cpu is None else f'{cpu:.0f}'}{vs} | {tp['rps']:,.0f} |"
        )
    return lines
