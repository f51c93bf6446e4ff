"""What the bench sends: the request, wrk's script and runs, and the blocking setup client.

**Every request is distinct**: the wrk script and the streaming client append a per-run nonce
and a counter to the prompt, as real traffic differs. Identical requests would let a cache or
a coalescing plugin answer without calling the emulator, and the bench would measure a
gateway doing less work than the bare proxy.
"""

from __future__ import annotations

import json
import re
import secrets
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench.procs import BenchError

PINNED_WRK = "4.1.0"  # Debian's `wrk` package; other versions may report slightly differently
MODEL = "gpt-5.4-mini"
CHAT = "/v1/chat/completions"
SMALL_BODY: dict[str, Any] = {
    "model": MODEL,
    "messages": [{"role": "user", "content": "Say hello to the benchmark"}],
    "max_tokens": 16,
}
STREAM_WORDS = 18  # + role, finish, usage and [DONE] events: a stream of ~20 events
STREAM_CHUNK_DELAY_MS = 1  # real pacing, so a buffering proxy could not hide behind one write
# No proxy handler: loopback traffic must never be sent through an http_proxy from the env.
_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))

_LUA = """\
-- Every request is distinct (thread id, counter and a per-run nonce in the prompt), as real
-- traffic is: a chain that caches or coalesces identical requests must still do its work.
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = {auth}
local body_fmt = {body_fmt}
local threads = 0
local counter, nonce = 0, ""
tid = 0  -- a global: setup() sets it in each thread's own Lua state

function setup(thread)
  threads = threads + 1
  thread:set("tid", threads)
end

function init(args)
  nonce = args[1] or ""
  counter = 0
end

function request()
  counter = counter + 1
  return wrk.format(nil, nil, nil, string.format(body_fmt, nonce, tid, counter))
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_RESULT {{"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"errors":{{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d}},' ..
    '"latency_us":{{"min":%.1f,"mean":%.1f,"stdev":%.1f,"max":%.1f,' ..
    '"p50":%.1f,"p90":%.1f,"p99":%.1f,"p999":%.1f}}}}\\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.min, latency.mean, latency.stdev, latency.max,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9)))
end
"""


def unique_body(tag: str, **extra: Any) -> dict[str, Any]:
    """The small chat completion with ``tag`` appended to its prompt (a distinct request)."""
    message = {**SMALL_BODY["messages"][0]}
    message["content"] = f"{message['content']} {tag}"
    return {**SMALL_BODY, "messages": [message], **extra}


def write_lua(path: Path, key: str, body: dict[str, Any] | None = None) -> None:
    """A wrk script posting distinct small chat completions (or ``body``, whose prompt holds
    the ``%s-%d-%d`` placeholder); done() prints one JSON line.

    json.dumps of an ASCII string is also a valid Lua string literal; the ``%s-%d-%d``
    placeholder becomes nonce-thread-counter.
    """
    fmt = json.dumps(unique_body("%s-%d-%d") if body is None else body, separators=(",", ":"))
    path.write_text(_LUA.format(body_fmt=json.dumps(fmt), auth=json.dumps(f"Bearer {key}")))


def wrk_version() -> str:
    """`wrk --version` prints e.g. "wrk debian/4.1.0-3+b2 [epoll] ..." (and exits 1)."""
    proc = subprocess.run(["wrk", "--version"], capture_output=True, text=True, check=False)
    m = re.search(r"^wrk (\S+)", proc.stdout + proc.stderr, re.MULTILINE)
    return m.group(1) if m else "unknown"


def run_wrk(
    url: str, script: Path, threads: int, conns: int, seconds: int, *, check: bool = True
) -> dict[str, Any]:
    """One wrk run; raises BenchError if any request got a non-2xx/3xx status."""
    argv = ["wrk", f"-t{threads}", f"-c{conns}", f"-d{seconds}s", "--timeout", "10s"]
    argv += ["--latency", "-s", str(script), url, "--", secrets.token_hex(4)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60, check=False)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH_RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise BenchError(f"wrk failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    result: dict[str, Any] = json.loads(line.removeprefix("BENCH_RESULT "))
    result["rps"] = result["requests"] / (result["duration_us"] / 1e6)
    if check and result["errors"]["status"]:
        raise BenchError(f"{url}: {result['errors']['status']} non-2xx replies:\n{proc.stdout}")
    return result


def http(
    method: str,
    url: str,
    body: Any = None,
    headers: dict[str, str] | None = None,
    reply_headers: dict[str, str] | None = None,
) -> Any:
    """A blocking JSON request for setup and sanity checks (never timed)."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    if data is not None:
        req.add_header("Content-Type", "application/json")
    with _HTTP.open(req, timeout=10) as resp:
        if reply_headers is not None:
            reply_headers.update({k.lower(): v for k, v in resp.headers.items()})
        return json.loads(resp.read())


def wait_ready(url: str, timeout: float = 30.0) -> None:
    """Poll the gateway's /readyz until its plugins have started."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if http("GET", url).get("status") == "ready":
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise BenchError(f"{url} never became ready")
        time.sleep(0.1)
