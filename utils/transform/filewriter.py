"""The OS-level machinery behind the transform's output files, behind one small interface.

A format writer (``formats.py``) or the transform's outputs (``outputs.py``) use:

- ``OutputFile(path, direct=...)``: ``pwrite(data, offset)`` from any thread, ``close(size)``;
- ``OrderedAppendFile``: appends in chunk order (``append(ticket, data)``, or ``place`` then
  ``write_at``), ``abort`` when a chunk fails;
- ``DirectWriter``: the background thread that writes large pieces around the page cache
  (``flush``, ``close``).

Two low-level tricks live here, each kept because the transform is at least 15% slower end to
end without it at 200,000 cells (``python bench/transform_bench.py --n_cells 200000 --repeats 2
--without o_direct mallopt``; the measurements, and the tricks that earned less and were removed:
``bench/README.md``):

- ``O_DIRECT`` writes (``DirectWriter``): +180% without them.
- glibc's malloc kept from unmapping freed chunks (``keep_freed_memory_for_reuse``): +34%.

The third, reading the input around HDF5, is ``direct_reader.py``.
"""

from __future__ import annotations

import ctypes
import errno
import os
import queue
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import numpy as np


class OutputAborted(RuntimeError):
    """Another chunk failed, so this one's turn to append will never come."""


class _Turns:
    """Hands out places in a sequence of appends in chunk order: chunk i gets its place as soon
    as chunk i - 1 has taken its own, so workers write their bytes side by side and only the
    cheap bookkeeping is serialized."""

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._next = 0
        self._failed = None  # the first ticket that failed; later tickets give up

    @contextmanager
    def turn(self, ticket: int) -> Iterator[None]:
        with self._condition:
            self._condition.wait_for(lambda: self._next == ticket or self._gave_up(ticket))
            if self._next != ticket:
                raise OutputAborted("an earlier chunk failed")
            yield
            self._next += 1
            self._condition.notify_all()

    def _gave_up(self, ticket: int) -> bool:
        return self._failed is not None and ticket > self._failed

    def abort(self, failed_ticket: int = -1) -> None:
        """Chunk ``failed_ticket`` will never take its turn: release the chunks after it
        (earlier chunks still finish, so their errors, not this one, reach the user first)."""
        with self._condition:
            self._failed = failed_ticket if self._failed is None else min(self._failed, failed_ticket)
            self._condition.notify_all()


def _pwrite_all(fd: int, data: Any, offset: int) -> None:
    view = memoryview(data).cast("B")
    while len(view):
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


# O_DIRECT needs file offsets, lengths and memory addresses aligned to the device's block size;
# a page is a multiple of every common one.
_DIRECT_ALIGN = 4096


_DIRECT_MIN_BYTES = 1 << 20  # smaller writes go through the page cache


class DirectWriter:
    """Writes the page-aligned middle of large writes with ``O_DIRECT``, from one background
    thread, so that the output bypasses the page cache while workers go on computing.

    Writing through the page cache costs kernel time for every byte (copying into fresh cache
    pages, then writeback); ``O_DIRECT`` writes at the disk's speed with almost no CPU. The data
    is copied into a few page-aligned buffers, which bound the memory in flight; ``flush`` waits
    for the queue and raises the first error. Every buffer gets used, so each one counts in the
    peak memory: four of 16 MB write about as fast as eight, with a lower peak
    (``bench/README.md``).
    """

    def __init__(self, *, n_buffers: int = 4, buffer_bytes: int = 16 << 20):
        self._free: queue.Queue = queue.Queue()
        for _ in range(n_buffers):
            raw = np.empty(buffer_bytes + _DIRECT_ALIGN, np.uint8)
            skip = -raw.ctypes.data % _DIRECT_ALIGN
            self._free.put(raw[skip : skip + buffer_bytes])
        self._jobs: queue.Queue = queue.Queue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="direct-writer", daemon=True)
        self._thread.start()

    def write(self, file: OutputFile, data: memoryview, offset: int) -> None:
        """Queue ``data`` (aligned length) for ``file`` at ``offset`` (aligned)."""
        if not self._thread.is_alive():
            raise RuntimeError("DirectWriter.write after close: nothing would write it")
        source = np.frombuffer(data, np.uint8)
        done = 0
        while done < len(source):
            buffer = self._free.get()
            if self._error is not None:
                self._free.put(buffer)
                raise self._error
            n = min(len(buffer), len(source) - done)
            np.copyto(buffer[:n], source[done : done + n])
            self._jobs.put((file, buffer, n, offset + done))
            done += n

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            file, data, n, offset = job
            try:
                if self._error is None:
                    file.write_aligned(data[:n], offset)
            except BaseException as err:  # noqa: BLE001 - handed to the caller by flush/write
                self._error = err
            finally:
                self._free.put(data)
                self._jobs.task_done()
        self._jobs.task_done()

    def flush(self) -> None:
        """Wait until every queued write is on disk; raise the first error of any."""
        self._jobs.join()
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        """Stop the thread (queued writes are still done; errors are dropped: call ``flush``)."""
        if self._thread.is_alive():
            self._jobs.put(None)
            self._thread.join()


class OutputFile:
    """A file written with ``pwrite`` from any thread; with a ``DirectWriter``, the aligned
    middle of large writes goes around the page cache (file systems that refuse ``O_DIRECT``,
    such as tmpfs, get plain writes)."""

    def __init__(self, path: Path, *, direct: DirectWriter | None = None, create: bool = True):
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | (os.O_CREAT | os.O_TRUNC if create else 0), 0o644)
        self._direct = direct
        self._direct_fd = None
        self._direct_refused = False
        if direct is not None and hasattr(os, "O_DIRECT"):
            with suppress(OSError):  # e.g. tmpfs: plain writes then
                self._direct_fd = os.open(path, os.O_WRONLY | os.O_DIRECT)

    def pwrite(self, data: Any, offset: int) -> None:
        """Write ``data`` at ``offset`` (large writes are copied into the direct writer's queue)."""
        view = memoryview(data).cast("B")
        first = -(-offset // _DIRECT_ALIGN) * _DIRECT_ALIGN
        last = (offset + view.nbytes) // _DIRECT_ALIGN * _DIRECT_ALIGN
        if self._direct_fd is None or last - first < _DIRECT_MIN_BYTES:
            _pwrite_all(self._fd, view, offset)
            return
        # The partial pages at both ends share pages with the neighbouring writes: those go
        # through the page cache, which merges them; the whole pages between go direct.
        _pwrite_all(self._fd, view[: first - offset], offset)
        _pwrite_all(self._fd, view[last - offset :], last)
        self._direct.write(self, view[first - offset : last - offset], first)

    def write_aligned(self, data: np.ndarray, offset: int) -> None:
        """Write page-aligned ``data`` at page-aligned ``offset`` (the ``DirectWriter``'s thread)."""
        if not self._direct_refused:
            try:
                _pwrite_all(self._direct_fd, data, offset)
                return
            except OSError as err:
                if err.errno != errno.EINVAL:
                    raise
                self._direct_refused = True  # opened, but refused: go through the page cache
        _pwrite_all(self._fd, data, offset)

    def close(self, final_size: int | None = None) -> None:
        if self._fd is not None and final_size is not None and final_size < os.fstat(self._fd).st_size:
            os.ftruncate(self._fd, final_size)
        for fd in (self._fd, self._direct_fd):
            if fd is not None:
                os.close(fd)
        self._fd = self._direct_fd = None


class OrderedAppendFile:
    """A file that chunks append to in chunk order (``ticket`` 0, 1, 2, ...), each from its own
    thread: every ticket must append exactly once, possibly nothing."""

    def __init__(self, path: Path, *, direct: DirectWriter | None = None):
        self.path = path
        self._out = OutputFile(path, direct=direct)
        self._turns = _Turns()
        self.size = 0

    def append(self, ticket: int, data: Any) -> None:
        self.write_at(data, self.place(ticket, memoryview(data).nbytes))

    def place(self, ticket: int, n: int) -> int:
        """Take ticket's turn: reserve its ``n`` bytes and return where they go (``write_at``)."""
        with self._turns.turn(ticket):
            offset = self.size
            self.size += n
        return offset

    def write_at(self, data: Any, offset: int) -> None:
        self._out.pwrite(data, offset)

    def abort(self, failed_ticket: int = -1) -> None:
        self._turns.abort(failed_ticket)

    def close(self) -> None:
        self._out.close(final_size=self.size)


def keep_freed_memory_for_reuse() -> None:
    """Ask glibc to keep freed memory in the heap instead of returning it to the system.

    The transform allocates arrays of tens of MB for every chunk. By default glibc serves those
    with fresh mmap()s and unmaps them when freed, so every chunk pays page faults on memory it
    just had. Reusing the heap removes that; peak memory stays bounded by the chunks in flight.
    It also asks for one malloc arena, which glibc applies only to arenas not yet made, so worker
    threads may still have their own (forcing one arena from the start does not lower the peak:
    ``bench/README.md``). Call it before starting threads. A no-op where glibc is not the C
    library. Kept by the 15% rule: +34% without it at 200,000 cells (``python
    bench/transform_bench.py --n_cells 200000 --repeats 2 --without mallopt``).
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_top_pad, m_mmap_threshold, m_arena_max = -1, -2, -3, -8  # glibc's malloc.h
    libc.mallopt(m_arena_max, ctypes.c_int(1))
    libc.mallopt(m_mmap_threshold, ctypes.c_int(1 << 30))
    libc.mallopt(m_trim_threshold, ctypes.c_int(2**31 - 1))
    libc.mallopt(m_top_pad, ctypes.c_int(256 << 20))
