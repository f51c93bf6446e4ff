"""``tollway keys``: create, list and revoke gateway API keys, and the admin API client.

Commands that touch live data (keys) talk to the running gateway's admin API, since the
gateway owns its state; with ``--state-dir`` they edit a stopped gateway's files directly.
``_admin`` is that client; the data commands (``proxy.cli.data``) use it too.
"""

from __future__ import annotations

import argparse
import os
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import orjson


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


def cmd_forget(args: argparse.Namespace) -> int:
    """Delete everything kept about a user, through the running gateway's admin API."""
    quoted = urllib.parse.quote(args.user, safe="")
    out = _admin(args.url, "DELETE", f"/admin/users/{quoted}/data")
    print(orjson.dumps(out, option=orjson.OPT_INDENT_2).decode())
    return 0
