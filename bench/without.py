"""Run transform.py with one of its low-level tricks turned off, to measure what it earns.

    python bench/without.py TRICK [transform.py flags ...]

Each trick is removed by patching the functions that hold it, so the code measured is the code
that ships, less that one trick (the tricks kept: see ``utils/transform/filewriter.py`` and
``utils/transform/direct_reader.py``; the ones that earned less than 15% were removed from the
code, and from here); ``bench/transform_bench.py --without TRICK ...`` runs these side by side
with the unchanged script. The outputs stay byte-identical (the tricks change how
bytes are written, never which).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _no_direct_reader() -> None:  # input read through h5py (and its global lock)
    from utils.transform import direct_reader

    direct_reader._DirectReader.open = classmethod(lambda cls, path, dataset: None)


def _no_o_direct() -> None:  # outputs written through the page cache
    from utils.transform import filewriter

    original = filewriter.OutputFile.__init__

    def init(self, path, *, direct=None, create=True):
        original(self, path, direct=None, create=create)

    filewriter.OutputFile.__init__ = init


def _no_mallopt() -> None:  # glibc's default malloc settings
    import transform

    transform.keep_freed_memory_for_reuse = lambda: None


TRICKS = {
    "direct_reader": _no_direct_reader,
    "o_direct": _no_o_direct,
    "mallopt": _no_mallopt,
}


def main(argv: list[str]) -> None:
    if not argv or argv[0] not in TRICKS:
        sys.exit(f"usage: without.py {{{','.join(TRICKS)}}} [transform.py flags]")
    trick, flags = argv[0], argv[1:]
    TRICKS[trick]()
    import transform
    from utils.cli import run_cli

    sys.argv = [str(ROOT / "transform.py"), *flags]
    run_cli(transform.main, transform.parse_args)


if __name__ == "__main__":
    main(sys.argv[1:])
