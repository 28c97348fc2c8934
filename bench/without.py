"""Run transform.py with one of its low-level tricks turned off, to measure what it earns.

    python bench/without.py TRICK [transform.py flags ...]

Each trick is removed by patching the functions that hold it, so the code measured is the code
that ships, less that one trick; ``bench/transform_bench.py --without TRICK ...`` runs these
side by side with the unchanged script. The outputs stay byte-identical (the tricks change how
bytes are written, never which).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _no_mmap() -> None:  # input ranges read with preadv instead of mapped
    from utils import readers

    readers._DirectReader._map = lambda self, lo, hi: None


def _no_direct_reader() -> None:  # input read through h5py (and its global lock)
    from utils import readers

    readers._DirectReader.open = classmethod(lambda cls, path, dataset: None)


def _no_o_direct() -> None:  # outputs written through the page cache
    from utils import filewriter

    original = filewriter.OutputFile.__init__

    def init(self, path, *, direct=None, create=True):
        original(self, path, direct=None, create=create)

    filewriter.OutputFile.__init__ = init


def _no_fallocate() -> None:  # no disk blocks reserved ahead of the writes
    from utils import filewriter

    filewriter._reserve_blocks = lambda fd, offset, length: False


def _no_phased_buffers() -> None:  # arrays placed anywhere: direct writes copy them first
    import numpy as np

    from utils import filewriter, formats, outputs

    formats.phased_empty = filewriter.phased_empty = lambda n, dtype, file_offset: np.empty(n, dtype)

    def back_to_back(offsets, sizes, *, slack):
        starts = np.concatenate([[0], np.cumsum(np.asarray(sizes, np.int64) + slack)[:-1]]).astype(np.int64)
        return np.empty(int(sum(sizes)) + len(sizes) * slack, np.uint8), starts

    outputs.phased_pieces = back_to_back


def _no_mallopt() -> None:  # glibc's default malloc settings
    import transform

    transform.keep_freed_memory_for_reuse = lambda: None


TRICKS = {
    "mmap": _no_mmap,
    "direct_reader": _no_direct_reader,
    "o_direct": _no_o_direct,
    "fallocate": _no_fallocate,
    "phased_buffers": _no_phased_buffers,
    "mallopt": _no_mallopt,
    "os_exit": lambda: None,  # run_cli's skip_teardown, turned off below
}


def main(argv: list[str]) -> None:
    if not argv or argv[0] not in TRICKS:
        sys.exit(f"usage: without.py {{{','.join(TRICKS)}}} [transform.py flags]")
    trick, flags = argv[0], argv[1:]
    TRICKS[trick]()
    import transform
    from utils.common import run_cli

    sys.argv = [str(ROOT / "transform.py"), *flags]
    run_cli(transform.main, transform.parse_args, skip_teardown=trick != "os_exit")


if __name__ == "__main__":
    main(sys.argv[1:])
