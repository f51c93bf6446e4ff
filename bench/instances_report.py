"""``bench/results-instances.md``: the three A/B comparisons of ``bench/instances.py``, the
Redis-state targets and the notes that say how far to trust a run (the JSON beside it is the
same report as data)."""

from __future__ import annotations

from typing import Any

from bench.policy import chain_label
from bench.redis_client import render_clients

TARGETS = (
    ("gateway CPU per request, redis / memory state", "gateway_cpu_ratio", "<=", 1.3),
    ("throughput at c=32, redis / memory state", "rps_ratio", ">=", 0.8),
)
"""One instance on Redis against one in memory (issue 13), checked on the paired median."""


def _ratio(x: dict[str, float]) -> str:
    return f"{x['median']:.2f} x ({x['min']:.2f}-{x['max']:.2f})"


def _cpu(side: dict[str, Any], role: str, key: str = "cpu_us_per_request") -> str:
    return f"{side[role][key]:.0f}" if role in side else "-"


def _table(pair: dict[str, Any], rows: list[tuple[str, Any, str]]) -> list[str]:
    a, b = pair["a"], pair["b"]
    out = [f"| | {a} | {b} | {b} / {a} |", "|---|---:|---:|---:|"]
    for label, get, ratio in rows:
        out.append(f"| {label} | {get(pair[a])} | {get(pair[b])} | {ratio} |")
    return out


def _common_rows(pair: dict[str, Any], roles: tuple[str, ...]) -> list[tuple[str, Any, str]]:
    rows: list[tuple[str, Any, str]] = [
        ("req/s", lambda s: f"{s['rps']:,.0f}", _ratio(pair["rps_ratio"])),
        (
            "gateway CPU µs per request (all rounds)",
            lambda s: _cpu(s, "gateway"),
            _ratio(pair["gateway_cpu_ratio"]),
        ),
        (
            "gateway CPU µs per request, best round",
            lambda s: _cpu(s, "gateway", "cpu_us_best_round"),
            "",
        ),
    ]
    for role in roles:
        rows.append((f"{role} CPU µs per request", lambda s, r=role: _cpu(s, r), ""))
    rows.append(
        (
            "cores used: " + ", ".join(("gateway", *roles)),
            lambda s: " / ".join(f"{s[r]['cores']:.2f}" for r in ("gateway", *roles) if r in s),
            "",
        )
    )
    rows.append(
        (
            "latency p50 / p99 at load (ms)",
            lambda s: f"{s['latency_p50_ms']:.2f} / {s['latency_p99_ms']:.2f}",
            "",
        )
    )
    return rows


def evaluate(r: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for label, key, op, limit in TARGETS:
        value = r["state"][key]["median"]
        ok = value <= limit if op == "<=" else value >= limit
        out.append({"target": label, "value": value, "op": op, "limit": limit, "pass": ok})
    return out


def render(r: dict[str, Any]) -> str:
    st, inst, work = r["state"], r["instances"], r["workers"]
    s = r["settings"]
    v = r["versions"]
    lines = [
        "# Redis state, instances and workers",
        "",
        f"`bench/run.py --state` (`bench/instances.py`), {r['date']}, tollway {r['revision']}"
        + (" (**--quick**)" if r["quick"] else "")
        + f", {r['elapsed_s']:.0f} s. Machine: {r['machine']['nproc']} cores, "
        f"{r['machine']['cpu']}, Linux {r['machine']['kernel']}. Python {v['python']}, "
        f"aiohttp {v['aiohttp']}, uvloop {v['uvloop']}, redis-py {v['redis']}, hiredis "
        f"{v['hiredis']}, redis-server {v['redis-server']}.",
        "",
        f"Chain: {chain_label(r['chain'])}; the bench key is on plan `{r['tier']}`; the bench "
        "policy as in `bench/results.md` (limits raised, files in a temporary folder). Every "
        "request is a distinct small chat completion (`x-tollway-cache: bypass`). A/B pairs in "
        "alternating rounds (A B, B A, ...); ratios are B / A per round: median (range).",
        "",
        "Policy changes: " + "; ".join(r["policy_changes"]) + ".",
        "",
        "## Memory vs Redis state, one instance",
        "",
        f"The same policy with `state.url: memory://` and `redis://` (limits, quotas, keys on "
        f"Redis; metering into the gateway's DuckDB in both). {s['state_rounds']} rounds of "
        f"{s['state_s']} s at c=32 (`wrk -t2 -c32`) and of {s['latency_s']} s at c=1 per side.",
        "",
        *_table(
            st,
            [
                *_common_rows(st, ("redis", "emulator")),
                (
                    "gateway + redis-server CPU µs per request",
                    lambda x: (
                        f"{x['gateway']['cpu_us_per_request'] + x['redis']['cpu_us_per_request']:.0f}"
                    ),
                    "",
                ),
                ("latency p50 at c=1 (ms)", lambda x: f"{x['latency_c1_p50_ms']:.3f}", ""),
            ],
        ),
        "",
        "| target | limit | measured | |",
        "|---|---:|---:|---|",
    ]
    for c in r["checks"]:
        verdict = "PASS" if c["pass"] else "FAIL"
        lines.append(
            f"| {c['target']} | {c['op']} {c['limit']} x | {c['value']:.2f} x | {verdict} |"
        )
    lines += [
        "",
        "## One vs three instances on Redis, one load",
        "",
        "`tollway serve` processes on one Redis as a multi-instance deployment runs them "
        "(`state.url: redis://`, `metering.sink: redis`, one `tollway meter` loading the "
        f"stream). One `wrk -t{s['scale_threads']} -c{s['scale_conns']}` for both sides: its "
        "`setup()` hook points thread k at instance k mod n, so three instances get a third of "
        "the connections each (an L4 balancer spreading connections, without a hop); one "
        f"instance gets all three threads. {s['scale_rounds']} rounds of {s['scale_s']} s.",
        "",
        *_table(inst, _common_rows(inst, ("redis", "meter", "emulator"))),
        "",
        "## `tollway serve --workers 1` vs `--workers 2`",
        "",
        "Same policy as the instances (workers need Redis state and `sink: redis`); one port, "
        "the kernel spreads connections over the workers (`SO_REUSEPORT`); `wrk -t2 -c32`; "
        "gateway CPU is the parent's and every worker's. "
        f"{s['scale_rounds']} rounds of {s['scale_s']} s.",
        "",
        *_table(work, _common_rows(work, ("redis", "meter", "emulator"))),
        "",
        "## One admission, per Redis client",
        "",
        "`bench/redis_client.py`: the limits plugin's admission (one EVALSHA, the six layers "
        "of the bench key) alone, in one process on uvloop, 1 caller and 32 concurrent; CPU "
        "per call of that process and of redis-server, best of the rounds.",
        "",
        *render_clients(r["clients"]),
        "",
        "## Notes",
        "",
        *[f"- {n}" for n in notes(r)],
        "",
    ]
    if r.get("profile"):
        from bench.profiling import render_profile

        text = render_profile(r["profile"], r).split("\n", 1)[1]
        lines += ["## Profile of the Redis-state gateway", text]
    return "\n".join(lines)


def notes(r: dict[str, Any]) -> list[str]:
    out = []
    bg = r["background"]
    out.append(
        f"Other processes used {bg['other_cores']:.2f} cores meanwhile (steal "
        f"{bg['steal_cores']:.2f})"
        + (": expect noisy numbers, run again" if bg["other_cores"] > 0.2 else "")
        + "."
    )
    cores = r["machine"]["nproc"]
    for name in ("instances", "workers"):
        pair = r[name]
        b = pair[pair["b"]]
        used = sum(
            b[role]["cores"] for role in ("gateway", "redis", "meter", "emulator") if role in b
        )
        out.append(
            f"{pair['b']}: gateways, redis-server, meter and emulator used {used:.2f} of "
            f"{cores} cores (wrk and other processes the rest): more gateway processes can "
            "only add throughput while cores are idle."
        )
    for name in (r["state"]["a"], r["state"]["b"]):
        side = r["state"][name]
        if "usage_rows" in side:
            extra, most = side["usage_rows_extra"], side["usage_rows_extra_max"]
            ok = 0 <= extra <= most
            out.append(
                f"{name}: {side['usage_rows']:,} usage rows for {side['requests']:,} requests wrk "
                f"counted ({extra:+d}; 0 to +{most} expected: requests in flight when wrk "
                "stopped)" + ("" if ok else ": **metering mismatch**") + "."
            )
    out.append("Phases (s): " + ", ".join(f"{k} {v}" for k, v in r["phases_s"].items()) + ".")
    return out
