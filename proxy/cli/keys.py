"""``tollway keys``: create, list, show, update, rotate and revoke gateway API keys, and the
admin API client.

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
from typing import TYPE_CHECKING, Any

import orjson

if TYPE_CHECKING:
    from proxy.keystore import KeyStore


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


def add_key_commands(ks: Any) -> None:
    """The ``tollway keys`` subcommands (``ks``: its subparsers)."""

    def lifecycle(c: argparse.ArgumentParser) -> None:
        c.add_argument("--name", help="what the key is for, e.g. 'web frontend'")
        c.add_argument("--expires-in", metavar="DURATION", help="e.g. 30d, 12h")
        c.add_argument("--expires-at", metavar="TIME", help="ISO-8601 (UTC) or Unix seconds")
        c.add_argument(
            "--models",
            metavar="A,B",
            help="scope: the models the key may use (within its plan's); 'all' for every one",
        )
        c.add_argument(
            "--features",
            metavar="A,B",
            help="scope: the features the key may use (within its plan's); 'all' for every one",
        )
        c.add_argument("--rpm", type=int, help="the key's own requests per minute (<= plan's)")
        c.add_argument(
            "--label",
            action="append",
            default=None,
            metavar="KEY=VALUE",
            help="a label copied into usage rows (repeat for more; replaces all on update)",
        )
        c.add_argument("--budget-usd", type=float, help="a monthly budget of this key, USD")

    kc = ks.add_parser("create", help="issue a key (the secret is printed once)")
    kc.add_argument("--user", required=True)
    kc.add_argument("--tier", required=True)
    lifecycle(kc)
    kc.add_argument("--quiet", "-q", action="store_true", help="print only the key")
    kl = ks.add_parser("list", help="one line a key: id, user, tier, source, name, expiry")
    kl.add_argument("--user", help="only this user's keys")
    ksh = ks.add_parser("show", help="a key's attributes as JSON (never its secret)")
    ksh.add_argument("id")
    ku = ks.add_parser("update", help="change a key's attributes (only those given)")
    ku.add_argument("id")
    ku.add_argument("--tier")
    lifecycle(ku)
    ku.add_argument(
        "--clear",
        action="append",
        default=[],
        choices=("expiry", "rpm", "labels", "budget", "name"),
        help="remove an attribute (repeat for more)",
    )
    kr = ks.add_parser("rotate", help="a new secret; the old one works for --grace more")
    kr.add_argument("id")
    kr.add_argument("--grace", default="24h", help="how long the old secret still works (0: none)")
    kr.add_argument("--quiet", "-q", action="store_true", help="print only the new key")
    kv = ks.add_parser("revoke", help="revoke a key, every secret of it")
    kv.add_argument("id")


def _scope(value: str | None) -> list[str] | None:
    return None if value in (None, "all") else [v.strip() for v in value.split(",") if v.strip()]


def _changes(args: argparse.Namespace, current: dict[str, Any] | None) -> dict[str, Any]:
    """The admin API body of a create (``current`` None) or an update from the flags."""
    from proxy.keyspec import parse_labels

    out: dict[str, Any] = {}
    if args.name is not None:
        out["name"] = args.name
    if args.expires_in is not None:
        out["expires_in"] = args.expires_in
    if args.expires_at is not None:
        at = args.expires_at
        out["expires_at"] = float(at) if at.replace(".", "", 1).isdigit() else at
    if args.models is not None or args.features is not None:  # scopes are replaced whole
        scopes = dict((current or {}).get("scopes") or {})
        if args.models is not None:
            scopes["models"] = _scope(args.models)
        if args.features is not None:
            scopes["features"] = _scope(args.features)
        out["scopes"] = scopes
    if args.rpm is not None:
        out["rpm"] = args.rpm
    if args.label is not None:
        try:
            out["labels"] = parse_labels(args.label)
        except Exception as e:
            raise SystemExit(str(e)) from None
    if args.budget_usd is not None:
        out["budget_usd"] = args.budget_usd
    cleared = {"expiry": "expires_at", "rpm": "rpm", "labels": "labels", "budget": "budget_usd"}
    for what in getattr(args, "clear", []):
        out[cleared.get(what, what)] = None
    if getattr(args, "tier", None) is not None and current is not None:
        out["tier"] = args.tier
    return out


def _offline(store: KeyStore, args: argparse.Namespace) -> Any:
    """A key command on a stopped gateway's key file (no policy: the plan is not checked)."""
    import time

    from proxy.errors import Reject
    from proxy.keyspec import parse
    from proxy.policy import parse_duration

    cmd = args.keys_cmd
    try:
        if cmd == "create":
            made, key = store.create(
                args.user, args.tier, **parse(_changes(args, None), time.time())
            )
            return {**made.public(), "key": key}
        rec = store.get(args.id)
        if rec is None:
            raise SystemExit(f"no key with id {args.id}")
        if cmd == "show":
            return rec.public()
        if cmd == "update":
            changes = parse(_changes(args, rec.public()), time.time())
            if args.tier is not None:
                changes["tier"] = args.tier
            updated = store.update(args.id, **changes)
            if updated is None:
                raise SystemExit(f"key {args.id} cannot be changed here (declared in the policy)")
            return updated.public()
        if cmd == "rotate":
            rotated = store.rotate(args.id, parse_duration(args.grace))
            if rotated is None:
                raise SystemExit(f"key {args.id} cannot be rotated here (declared in the policy)")
            new, old, key = rotated
            return {**new.public(), "key": key, "previous_key_valid_until": old.grace_until}
    except Reject as e:
        raise SystemExit(e.message) from None
    except ValueError as e:
        raise SystemExit(str(e)) from None
    raise AssertionError(cmd)


def cmd_keys(args: argparse.Namespace) -> int:
    from proxy.keystore import KeyStore

    store = KeyStore(Path(args.state_dir) / "keys.json") if args.state_dir else None
    cmd = args.keys_cmd
    if cmd == "list":
        rows: list[dict[str, Any]]
        if store is not None:
            rows = [r.public() for r in store.list()]
            rows = [r for r in rows if args.user is None or r["user"] == args.user]
        else:
            query = f"?user={urllib.parse.quote(args.user, safe='')}" if args.user else ""
            rows = _admin(args.url, "GET", "/admin/keys" + query)["data"]
        for r in rows:
            expires = r.get("expires_at")
            shown = _iso(expires) if expires else "-"
            print(
                f"{r['id']}\t{r['user']}\t{r['tier']}\t{r['source']}\t{r.get('name') or '-'}"
                f"\t{shown}"
            )
        return 0
    if cmd == "revoke":
        if store is not None:
            if not store.revoke(args.id):
                raise SystemExit(f"no key with id {args.id}")
        else:
            _admin(args.url, "DELETE", f"/admin/keys/{_quoted(args.id)}")
        print(f"revoked {args.id}")
        return 0
    if store is not None:
        out: Any = _offline(store, args)
    elif cmd == "create":
        body = {"user": args.user, "tier": args.tier, **_changes(args, None)}
        out = _admin(args.url, "POST", "/admin/keys", body)
    elif cmd == "show":
        out = _admin(args.url, "GET", f"/admin/keys/{_quoted(args.id)}")
    elif cmd == "update":
        current = _admin(args.url, "GET", f"/admin/keys/{_quoted(args.id)}")
        out = _admin(args.url, "PATCH", f"/admin/keys/{_quoted(args.id)}", _changes(args, current))
    else:  # rotate
        out = _admin(
            args.url, "POST", f"/admin/keys/{_quoted(args.id)}/rotate", {"grace": args.grace}
        )
    if getattr(args, "quiet", False):
        print(out["key"])
    else:
        print(orjson.dumps(out, option=orjson.OPT_INDENT_2).decode())
    return 0


def _quoted(key_id: str) -> str:
    return urllib.parse.quote(key_id, safe="")


def _iso(seconds: float) -> str:
    from proxy.keyspec import when

    return when(seconds)


def cmd_forget(args: argparse.Namespace) -> int:
    """Delete everything kept about a user, through the running gateway's admin API."""
    quoted = urllib.parse.quote(args.user, safe="")
    out = _admin(args.url, "DELETE", f"/admin/users/{quoted}/data")
    print(orjson.dumps(out, option=orjson.OPT_INDENT_2).decode())
    return 0
