"""Ctrl-C or SIGTERM while a script's libraries load: one line and no traceback.

Each script imports this first, before torch, anndata and the rest take seconds to load; the
handlers go in only when that script is the program being run (not when a test or a notebook
imports it), and ``utils.cli.run_cli`` installs the run's own once the imports are done. Standard library only, so it is in place within milliseconds (a module
inside ``utils/`` would first run ``utils/__init__``, which loads numba).
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path


def _stop(signum: int, frame: object) -> None:
    print("Stopped while starting; nothing was written.", file=sys.stderr)
    os._exit(128 + signum)


def install() -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _stop)


def _run_as_a_script() -> bool:
    """Whether the program is one of the scripts next to this file (``python predict.py``)."""
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    return getattr(main, "__spec__", None) is None and bool(path) and Path(path).resolve().parent == Path(__file__).resolve().parent


if _run_as_a_script():
    install()
