"""The SDKs' test suites: the source distributions of the installed versions, from PyPI.

The wheels that ``pip install`` brings hold no tests; the sdists do. The sdist of exactly the
installed version is fetched (its tests describe that version's types), once per cache
folder: a fresh clone downloads it once, a developer's checkout keeps it. Only ``tests/`` is
extracted, so the SDK under test is always the installed one, never the sdist's ``src/``.
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
from importlib import metadata
from pathlib import Path


class FetchError(Exception):
    """The sdist could not be had (no network, no such version, a broken archive)."""


def installed_version(dist: str) -> str:
    """The version of ``dist`` installed beside this interpreter."""
    return metadata.version(dist)


def sdist_path(cache: Path, dist: str, version: str) -> Path | None:
    """The cached sdist of ``dist==version``, if it was downloaded before."""
    for suffix in (".tar.gz", ".zip"):
        path = cache / f"{dist.replace('-', '_')}-{version}{suffix}"
        if path.exists():
            return path
        path = cache / f"{dist}-{version}{suffix}"
        if path.exists():
            return path
    return None


def download(cache: Path, dist: str, version: str) -> Path:
    """The sdist of ``dist==version`` in ``cache``, downloaded with pip unless it is there.

    pip, not a hand-made HTTP client: it honours the machine's index configuration (a
    mirror, a proxy, certificates) the way every other install here does.
    """
    cache.mkdir(parents=True, exist_ok=True)
    found = sdist_path(cache, dist, version)
    if found is not None:
        return found
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-binary", ":all:"]
    cmd += ["--no-deps", "--disable-pip-version-check", "-d", str(cache), f"{dist}=={version}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=600)
    found = sdist_path(cache, dist, version)
    if proc.returncode != 0 or found is None:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise FetchError(
            f"pip could not download the sdist of {dist}=={version}: " + " | ".join(tail)
        )
    return found


def extract_tests(archive: Path, dest: Path) -> Path:
    """Extract the sdist's ``tests/`` into ``dest/<name>-<version>/``; that folder.

    A previous extraction is reused: the archive of one version never changes.
    """
    root = dest / archive.name.removesuffix(".tar.gz").removesuffix(".zip")
    if (root / "tests" / "conftest.py").exists():
        return root
    try:
        with tarfile.open(archive) as tar:
            members = [
                m
                for m in tar.getmembers()
                if "/tests/" in m.name and m.name.split("/", 2)[1] == "tests"
            ]
            if not members:
                raise FetchError(f"{archive.name} holds no tests/ folder")
            top = members[0].name.split("/", 1)[0]
            # "data": no absolute paths, no links out of dest, no device files
            tar.extractall(dest, members=members, filter="data")
    except (tarfile.TarError, OSError) as exc:
        raise FetchError(f"cannot extract {archive}: {exc}") from exc
    extracted = dest / top
    if extracted != root:
        extracted.rename(root)
    return root
