"""``python -m proxy.cli``: the ``tollway`` command without the installed console script."""

from __future__ import annotations

from proxy.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
