"""Ctrl-C or SIGTERM while a script's libraries load: one line and no traceback.

Each script imports this first, under ``if __name__ == "__main__":``, before torch, anndata and
the rest take seconds to load; ``utils.cli.run_cli`` installs the run's own handlers once
the imports are done. Standard library only, so it is in place within milliseconds (a module
inside ``utils/`` would first run ``utils/__init__``, which loads numba).
"""

from __future__ import annotations

import os
import signal
import sys


def _stop(signum: int, frame: object) -> None:
    print("Stopped while starting; nothing was written.", file=sys.stderr)
    os._exit(128 + signum)


def install() -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _stop)
