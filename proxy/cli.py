"""The ``tollway`` command.

Commands that touch live data (keys) talk to the running gateway's admin API, since the
gateway owns its state; with ``--state-dir`` they edit a stopped gateway's files directly.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import secrets
import signal
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

from proxy.policy import LoadedPolicy, PolicyError, load_file

log = logging.getLogger("tollway")


def _run(coro: Any) -> None:
    """Run on uvloop when it is installed (faster sockets), else on asyncio's loop."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(coro)
        return
    uvloop.run(coro)


def _load(path: str) -> LoadedPolicy:
    try:
        return load_file(path)
    except PolicyError as e:
        print(f"{path}: invalid policy", file=sys.stderr)
        for line in e.errors:
            print(f"  {line}", file=sys.stderr)
        raise SystemExit(1) from None


async def _start(app: web.Application, host: str, port: int) -> tuple[web.AppRunner, int]:
    """Set up and bind; a failure (a plugin that cannot start, a taken port) is one line."""
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    try:
        await runner.setup()
        site = web.TCPSite(runner, host, port, backlog=4096, reuse_address=True)
        await site.start()
    except OSError as e:
        await runner.cleanup()
        print(f"tollway: cannot listen on {host}:{port}: {e.strerror}", file=sys.stderr)
        raise SystemExit(1) from None
    except Exception as e:
        await runner.cleanup()
        print(f"tollway: cannot start: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    server = site._server
    sockets = getattr(server, "sockets", None)
    bound = sockets[0].getsockname()[1] if sockets else port
    return runner, bound


GC_THRESHOLD = 10_000


def _tune_gc() -> None:
    """Keep the cyclic garbage collector off the request path.

    Start-up objects (modules, the policy, plugin configs: ~70k of them) live as long as the
    process, so they are frozen out of every later collection. A request allocates hundreds of
    short-lived containers that die by reference counting (tests/proxy/test_cycles.py keeps it
    so); with CPython's default first-generation threshold of 700 the collector still ran every
    ~20 requests under load, walking the in-flight requests' objects only to promote them.
    Measured with ``gc.callbacks`` under c=32 load: collections took ~39 µs per request before
    this and the end of the per-request cycle; none ran at all in a 5 s run after. The price:
    start-up objects that a reload later drops are freed by reference counting only, so any
    reference cycle among them stays (a policy's worth of memory at most, per reload).
    """
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GC_THRESHOLD, gen1, gen2)


async def _run_gateway(loaded: LoadedPolicy, host: str, port: int, banner: Any = None) -> None:
    from proxy.app import create_app
    from proxy.appkeys import GATEWAY

    try:
        app = create_app(loaded)
    except PolicyError as e:
        for line in e.errors:
            print(f"  {line}", file=sys.stderr)
        raise SystemExit(1) from None
    runner, bound = await _start(app, host, port)
    _tune_gc()
    print(f"tollway listening on http://{host}:{bound}", flush=True)
    if banner is not None:
        banner(app, bound)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    async def reload() -> None:
        try:
            await app[GATEWAY].reload()
            print("policy reloaded", flush=True)
        except PolicyError as e:
            print("policy reload refused; the previous policy keeps serving:", file=sys.stderr)
            for line in e.errors:
                print(f"  {line}", file=sys.stderr)

    tasks: set[asyncio.Task[None]] = set()

    def on_hup() -> None:
        task = loop.create_task(reload())
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    loop.add_signal_handler(signal.SIGHUP, on_hup)
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    await stop.wait()
    await runner.cleanup()


def cmd_serve(args: argparse.Namespace) -> int:
    loaded = _load(args.policy)
    listen = loaded.policy.listen
    port = args.port if args.port is not None else listen.port
    _run(_run_gateway(loaded, args.host or listen.host, port))
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    loaded = _load(args.file)
    from proxy.chain import compile_chain

    try:
        chain = compile_chain(loaded)
    except PolicyError as e:
        print(f"{args.file}: invalid policy", file=sys.stderr)
        for line in e.errors:
            print(f"  {line}", file=sys.stderr)
        return 1
    print(
        f"{args.file}: ok ({len(loaded.policy.models)} models, chain: "
        f"{', '.join(chain.names) or 'empty'})"
    )
    return 0


def cmd_emulator(args: argparse.Namespace) -> int:
    from proxy.emulator import serve

    serve(args.host, args.port, api_key=args.api_key)
    return 0


def _admin(url: str, method: str, path: str, body: Any = None) -> Any:
    key = os.environ.get("TOLLWAY_ADMIN_KEY")
    if not key:
        raise SystemExit("set TOLLWAY_ADMIN_KEY to the gateway's admin key")
    req = urllib.request.Request(
        url.rstrip("/") + path,
        method=method,
        data=orjson.dumps(body) if body is not None else None,
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return orjson.loads(resp.read())
    except urllib.error.HTTPError as e:
        detail = e.read().decode("utf-8", "replace")
        raise SystemExit(f"admin API error {e.code}: {detail}") from None
    except urllib.error.URLError as e:
        raise SystemExit(f"cannot reach the gateway at {url}: {e.reason}") from None


def cmd_keys(args: argparse.Namespace) -> int:
    from proxy.keystore import KeyStore

    store = KeyStore(Path(args.state_dir) / "keys.json") if args.state_dir else None
    if args.keys_cmd == "create":
        if store is not None:
            rec, key = store.create(args.user, args.tier)
            out: Any = {"id": rec.id, "key": key, "user": rec.user, "tier": rec.tier}
        else:
            out = _admin(args.url, "POST", "/admin/keys", {"user": args.user, "tier": args.tier})
        print(out["key"] if args.quiet else orjson.dumps(out, option=orjson.OPT_INDENT_2).decode())
    elif args.keys_cmd == "list":
        rows = (
            [r.public() for r in store.list()]
            if store
            else _admin(args.url, "GET", "/admin/keys")["data"]
        )
        for r in rows:
            print(f"{r['id']}\t{r['user']}\t{r['tier']}\t{r['source']}")
    else:
        if store is not None:
            if not store.revoke(args.id):
                raise SystemExit(f"no key with id {args.id}")
        else:
            _admin(args.url, "DELETE", f"/admin/keys/{args.id}")
        print(f"revoked {args.id}")
    return 0


def _offline_db(path: str) -> Any:
    """Open a stopped gateway's usage database, loading rows its spool still holds."""
    from plugins.spool import Spool
    from plugins.usage_db import UsageDB

    try:
        db = UsageDB(path)
    except Exception as e:  # duckdb raises IOException when the gateway holds the lock
        raise SystemExit(f"cannot open {path}: {e}\n(is the gateway running? use --url)") from None
    spool_dir = Path(path).with_suffix(".spool")
    if spool_dir.is_dir():
        spool = Spool(spool_dir)
        spool.rotate()
        for segment in spool.closed():
            db.ingest(segment)  # and deletes it
        spool.close()
    return db


def _query(args: argparse.Namespace, sql: str) -> tuple[list[str], list[list[Any]]]:
    if args.db:
        from proxy.usage import ReadOnlyQuery

        db = _offline_db(args.db)
        try:
            return db.query(sql)  # type: ignore[no-any-return]
        except ReadOnlyQuery as e:
            raise SystemExit(f"refused: {e}") from None
        except Exception as e:
            raise SystemExit(f"SQL error: {e}") from None
        finally:
            db.close()
    out = _admin(args.url, "POST", "/admin/sql", {"query": sql})
    return out["columns"], out["rows"]


def _print_table(columns: list[str], rows: list[list[Any]]) -> None:
    cells = [[str(c) for c in columns]] + [["" if v is None else str(v) for v in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    for n, row in enumerate(cells):
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())
        if n == 0:
            print("  ".join("-" * w for w in widths))


def cmd_sql(args: argparse.Namespace) -> int:
    columns, rows = _query(args, args.query)
    if args.json:
        print(orjson.dumps({"columns": columns, "rows": rows}, default=str).decode())
    else:
        _print_table(columns, rows)
    return 0


def cmd_invoice(args: argparse.Namespace) -> int:
    from proxy.usage import invoice_csv

    if args.db:
        db = _offline_db(args.db)
        try:
            invoice = db.invoice(args.user, args.month)
        finally:
            db.close()
    else:
        invoice = _admin(args.url, "GET", f"/admin/invoices/{args.user}?month={args.month}")
    if args.format == "csv":
        sys.stdout.write(invoice_csv(invoice))
    else:
        print(orjson.dumps(invoice, option=orjson.OPT_INDENT_2).decode())
    return 0


_TARGETS = (
    ("cache_hit_rate", "cache hit rate (%)", ">", 50.0),
    ("avg_response_ms", "average response (ms)", "<", 500.0),
    ("error_rate", "error rate (%)", "<", 1.0),
)


def cmd_report(args: argparse.Namespace) -> int:
    columns, rows = _query(args, "SELECT * FROM kpis")
    kpis = dict(zip(columns, rows[0], strict=True)) if rows else {}
    print("Technical KPIs")
    for name in columns:
        print(f"  {name:28} {_fmt(kpis.get(name))}")
    print("\nTargets")
    for name, label, op, target in _TARGETS:
        value = kpis.get(name)
        if value is None:
            verdict = "no data"
        else:
            ok = float(value) > target if op == ">" else float(value) < target
            verdict = "MET" if ok else "MISSED"
        print(f"  {label:28} {_fmt(value):>12}  target {op} {target:g}  {verdict}")
    columns, rows = _query(args, "SELECT * FROM business ORDER BY month")
    print("\nBusiness (per month)")
    _print_table(columns, [[_fmt(v) for v in r] for r in rows])
    return 0


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    try:
        f = float(value)
    except (TypeError, ValueError):
        return str(value)
    return f"{f:,.4f}".rstrip("0").rstrip(".") if f != int(f) else f"{int(f):,}"


def cmd_export(args: argparse.Namespace) -> int:
    folder = str(Path(args.parquet).resolve())
    if args.db:
        db = _offline_db(args.db)
        try:
            rows = db.export_parquet(folder)
        finally:
            db.close()
    else:
        rows = _admin(args.url, "POST", "/admin/export", {"dir": folder})["rows"]
    print(f"exported {rows} rows to {folder} (Parquet, partitioned by day)")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Emulator + gateway in one process, a demo key printed with ready-to-run examples."""
    os.environ.setdefault("TOLLWAY_ADMIN_KEY", "admin_" + secrets.token_urlsafe(18))
    os.environ.setdefault("OPENAI_API_KEY", "emulator-openai-key")
    os.environ.setdefault("ANTHROPIC_API_KEY", "emulator-anthropic-key")
    loaded = _load(args.policy)
    from urllib.parse import urlsplit

    emu_urls = [p.base_url for p in loaded.policy.providers.values()]
    emu_port = urlsplit(emu_urls[0]).port or 9100 if emu_urls else 9100

    def banner(app: web.Application, port: int) -> None:
        from proxy.appkeys import GATEWAY

        _, key = app[GATEWAY].keystore.create("demo", args.tier)
        base = f"http://{args.host}:{port}"
        print(
            _DEMO_BANNER.format(
                base=base,
                key=key,
                admin=os.environ["TOLLWAY_ADMIN_KEY"],
                emu=f"http://127.0.0.1:{emu_port}",
            ),
            flush=True,
        )

    async def main() -> None:
        from proxy.emulator import create_emulator_app

        emu_runner, _ = await _start(create_emulator_app(), "127.0.0.1", emu_port)
        try:
            await _run_gateway(loaded, args.host, args.port, banner)
        finally:
            await emu_runner.cleanup()

    _run(main())
    return 0


_DEMO_BANNER = """
Tollway demo is running (upstream: the built-in emulator at {emu}).
  demo key (user 'demo'): {key}
  admin key:              {admin}

Try it with curl:
  curl {base}/v1/chat/completions \\
    -H "Authorization: Bearer {key}" -H "Content-Type: application/json" \\
    -d '{{"model": "gpt-5.4-mini", "messages": [{{"role": "user", "content": "Hello, Tollway"}}]}}'

or with the OpenAI Python SDK:
  from openai import OpenAI
  client = OpenAI(base_url="{base}/v1", api_key="{key}")
  reply = client.chat.completions.create(
      model="gpt-5.4-mini", messages=[{{"role": "user", "content": "Hello, Tollway"}}])
  print(reply.choices[0].message.content)

Press Ctrl-C to stop.
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tollway", description="Tollway AI API gateway")
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("serve", help="run the gateway")
    s.add_argument("--policy", default="policies.yaml", help="policy file (default policies.yaml)")
    s.add_argument("--host", default=None)
    s.add_argument("--port", type=int, default=None)
    s.set_defaults(fn=cmd_serve)

    c = sub.add_parser("check", help="validate a policy file (exit 1 with errors)")
    c.add_argument("file")
    c.set_defaults(fn=cmd_check)

    e = sub.add_parser("emulator", help="run the OpenAI/Anthropic-compatible upstream emulator")
    e.add_argument("--host", default="127.0.0.1")
    e.add_argument("--port", type=int, default=9100)
    e.add_argument("--api-key", default=None, help="require this key from callers")
    e.set_defaults(fn=cmd_emulator)

    k = sub.add_parser("keys", help="create, list and revoke gateway API keys")
    k.add_argument(
        "--url",
        default=os.environ.get("TOLLWAY_URL", "http://127.0.0.1:8080"),
        help="the running gateway (admin key from TOLLWAY_ADMIN_KEY)",
    )
    k.add_argument("--state-dir", default=None, help="edit a stopped gateway's key file instead")
    ks = k.add_subparsers(dest="keys_cmd", required=True)
    kc = ks.add_parser("create")
    kc.add_argument("--user", required=True)
    kc.add_argument("--tier", required=True)
    kc.add_argument("--quiet", "-q", action="store_true", help="print only the key")
    ks.add_parser("list")
    kr = ks.add_parser("revoke")
    kr.add_argument("id")
    k.set_defaults(fn=cmd_keys)

    def data_cmd(name: str, help: str) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=help)
        c.add_argument(
            "--url",
            default=os.environ.get("TOLLWAY_URL", "http://127.0.0.1:8080"),
            help="the running gateway (admin key from TOLLWAY_ADMIN_KEY)",
        )
        c.add_argument("--db", default=None, help="a stopped gateway's usage database file")
        return c

    q = data_cmd("sql", "read-only SQL over the usage database")
    q.add_argument("query")
    q.add_argument("--json", action="store_true", help="print JSON instead of a table")
    q.set_defaults(fn=cmd_sql)
    inv = data_cmd("invoice", "a user's monthly invoice")
    inv.add_argument("--user", required=True)
    inv.add_argument("--month", required=True, help="YYYY-MM (UTC)")
    inv.add_argument("--format", choices=("json", "csv"), default="json")
    inv.set_defaults(fn=cmd_invoice)
    rep = data_cmd("report", "KPIs against the targets, and the business figures")
    rep.set_defaults(fn=cmd_report)
    ex = data_cmd("export", "write usage as Parquet partitioned by day")
    ex.add_argument("--parquet", required=True, metavar="DIR")
    ex.set_defaults(fn=cmd_export)

    d = sub.add_parser("demo", help="emulator + gateway with the demo policy and a demo key")
    d.add_argument("--policy", default="policies.demo.yaml")
    d.add_argument("--host", default="127.0.0.1")
    d.add_argument("--port", type=int, default=8080)
    d.add_argument("--tier", default="pro")
    d.set_defaults(fn=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    args = build_parser().parse_args(argv)
    return int(args.fn(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
