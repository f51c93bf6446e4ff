"""The generated policy: the shipped ``policies.yaml`` with only what would make the numbers
meaningless changed, and every change listed (the report shows them under "policy changes").

The chain itself is never reordered, disabled or trimmed here: the gateway's cost is the cost
of the chain an operator ships. ``variant`` takes a prefix of it (for the per-plugin cost) and
moves every file a gateway writes into a temporary folder, so a bench never writes a
deployment's data and two gateways never share a quota file or a database.
"""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

from bench.procs import ROOT

HUGE = 1_000_000_000  # "no limit" for the bench: far above anything a run can send


def _walk_secrets(node: Any, base: Path, env_names: set[str]) -> None:
    """Collect ``$env`` names; make relative ``$file`` paths absolute (the copy lives elsewhere)."""
    if isinstance(node, dict):
        if len(node) == 1 and "$env" in node:
            env_names.add(str(node["$env"]))
            return
        if len(node) == 1 and "$file" in node:
            path = Path(str(node["$file"])).expanduser()
            node["$file"] = str(path if path.is_absolute() else base / path)
            return
        for value in node.values():
            _walk_secrets(value, base, env_names)
    elif isinstance(node, list):
        for value in node:
            _walk_secrets(value, base, env_names)


_RATE_STRING = re.compile(r"(\d+)(\s*(?:/|per\b))")


def _unlimit(node: Any) -> Any:
    """Every positive integer -> HUGE, and "N/minute" or "N per minute" strings -> "HUGE/minute".

    Blunt on purpose: it does not need to know a limits plugin's schema. It also raises numbers
    that are windows or queue sizes, which only makes the limit looser. Floats, durations such
    as "1m", zeros and booleans are left alone.
    """
    if isinstance(node, dict):
        return {k: _unlimit(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_unlimit(v) for v in node]
    if isinstance(node, int) and not isinstance(node, bool) and node > 0:
        return HUGE
    if isinstance(node, str):
        return _RATE_STRING.sub(lambda m: f"{HUGE}{m.group(2)}", node)
    return node


def bench_policy(src: Path, emulator_url: str) -> tuple[dict[str, Any], list[str], set[str]]:
    """The shipped policy with only what the bench needs changed; returns (policy, changes, env).

    - every provider's ``base_url`` points at the emulator (``/v1`` suffix for OpenAI kinds);
    - every tier value named ``*_per_*`` that is an integer becomes HUGE (quota, rpm, tpm):
      the bench sends tens of thousands of requests from one key and must not measure 429s;
    - ``chain`` items named ``limits`` keep their place in the chain (their cost is part of
      the gateway's) but their config goes through ``_unlimit``.
    The plugin chain itself is never reordered, disabled or trimmed here; ``variant`` takes a
    prefix of it and moves every file the gateway writes into a temporary folder.
    """
    data = yaml.safe_load(src.read_text())
    changes: list[str] = []
    for name, provider in (data.get("providers") or {}).items():
        suffix = "/v1" if provider.get("kind") == "openai" else ""
        provider["base_url"] = emulator_url + suffix
        changes.append(f"providers.{name}.base_url -> emulator")
    for tier_name, tier in (data.get("tiers") or {}).items():
        for key, value in tier.items():
            if "_per_" in key and isinstance(value, int) and not isinstance(value, bool):
                tier[key] = HUGE
                changes.append(f"tiers.{tier_name}.{key}: {value} -> {HUGE}")
    for i, item in enumerate(data.get("chain") or []):
        if item.get("name") == "limits" and item.get("config"):
            item["config"] = _unlimit(item["config"])
            changes.append(f"chain[{i}] (limits).config: integers and rates -> {HUGE}")
    env_names: set[str] = set()
    _walk_secrets(data, src.resolve().parent, env_names)
    return data, changes, env_names


# config keys of chain items that name a file or folder the plugin writes (metering's
# ``database`` and ``spool_dir``, ...): a bench must never touch a deployment's data.
_FILE_KEY = re.compile(r"^(database|db|path|file|dir|\w+_(dir|path|db))$")


def _redirect_files(node: Any, dest: Path, where: str, changes: list[str]) -> Any:
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            if isinstance(v, str) and _FILE_KEY.match(str(k)):
                out[k] = str(dest / Path(v).name)
                changes.append(f"{where}.{k}: {v} -> temp dir")
            else:
                out[k] = _redirect_files(v, dest, f"{where}.{k}", changes)
        return out
    if isinstance(node, list):
        return [_redirect_files(v, dest, f"{where}[{i}]", changes) for i, v in enumerate(node)]
    return node


def variant(
    base: dict[str, Any], n: int, folder: Path
) -> tuple[dict[str, Any], list[str], list[str]]:
    """The bench policy with only the first ``n`` chain items; returns (policy, chain, changes).

    Each gateway gets its own ``state.dir`` and its own folder for plugin files under
    ``folder``, so prefixes never share a quota file or a database.
    """
    policy = copy.deepcopy(base)
    items = (policy.get("chain") or [])[:n]
    changes = ["state.dir -> temp dir"]
    policy["state"] = {**(policy.get("state") or {}), "dir": str(folder / "state")}
    for i, item in enumerate(items):
        if item.get("config"):
            where = f"chain[{i}] ({item.get('name')}).config"
            item["config"] = _redirect_files(item["config"], folder / "files", where, changes)
    policy["chain"] = items
    return policy, [str(item.get("name")) for item in items], changes


def write_variant(
    base: dict[str, Any], n: int, folder: Path, keys_json: Path
) -> tuple[Path, list[str], list[str]]:
    """``variant`` written to ``folder/policy.yaml`` with the bench key's ``keys.json`` in its
    state folder; returns (policy file, chain, changes)."""
    policy, names, changes = variant(base, n, folder)
    (folder / "state").mkdir(parents=True)
    shutil.copy(keys_json, folder / "state" / "keys.json")
    path = folder / "policy.yaml"
    path.write_text(yaml.safe_dump(policy, sort_keys=False))
    return path, names, changes


def pick_tier(policy: dict[str, Any]) -> str:
    """The plan with the highest priority (usually the one with every feature)."""
    tiers = policy.get("tiers") or {}
    if not tiers:
        return "bench"
    return str(max(tiers, key=lambda t: (tiers[t] or {}).get("priority", 0)))


def create_bench_key(
    tollway: list[str], folder: Path, policy: dict[str, Any], env: dict[str, str]
) -> str:
    """A key for user "bench" on the policy's top plan, made with ``tollway keys --state-dir``
    in ``folder`` (its ``keys.json`` is then copied into each gateway's state)."""
    argv = [*tollway, "keys", "--state-dir", str(folder), "create"]
    argv += ["--user", "bench", "--tier", pick_tier(policy), "-q"]
    made = subprocess.run(argv, capture_output=True, text=True, env=env, check=True, cwd=ROOT)
    return made.stdout.strip().splitlines()[-1]


def chain_label(chain: list[str]) -> str:
    """How a chain is named in the reports: its plugins in order, or "(empty)"."""
    return ", ".join(chain) if chain else "(empty)"
