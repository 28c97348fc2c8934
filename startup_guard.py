"""Ctrl-C or SIGTERM while a script's libraries load: one line and no traceback (until ``run_cli``'s handlers).

Imported first by each script, only when it is the program run; standard library only (``utils/`` would load numba).
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path


def _stop(signum: int, frame: object) -> None:
    print("Stopped while starting; nothing was written.", file=sys.stderr)
    os._exit(128 + signum)


def _run_as_a_script() -> bool:
    """Whether the program is one of the scripts next to this file (``python predict.py``)."""
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    return (getattr(main, "__spec__", None) is None and bool(path)
            and Path(path).resolve().parent == Path(__file__).resolve().parent)


if _run_as_a_script():
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _stop)
