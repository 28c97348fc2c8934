"""The OS-level machinery behind the transform's output files: ``OutputFile`` (``pwrite`` from any
thread), ``OrderedAppendFile`` (appends in chunk order), ``DirectWriter`` (``O_DIRECT`` writes from a
background thread) and ``keep_freed_memory_for_reuse`` (each measured in ``bench/README.md``)."""

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
    """Places in a sequence of appends in chunk order: chunk i gets its place as soon as chunk i - 1
    has taken its own, so only the bookkeeping is serialized."""

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
        """Chunk ``failed_ticket`` will never take its turn: release the chunks after it (earlier ones
        still finish, so their errors reach the user first)."""
        with self._condition:
            self._failed = failed_ticket if self._failed is None else min(self._failed, failed_ticket)
            self._condition.notify_all()


def _pwrite_all(fd: int, data: Any, offset: int) -> None:
    view = memoryview(data).cast("B")
    while len(view):
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


# O_DIRECT needs offsets, lengths and addresses aligned to the block size; a page is a multiple of any.
_DIRECT_ALIGN = 4096
_DIRECT_MIN_BYTES = 1 << 20  # smaller writes go through the page cache


class DirectWriter:
    """Writes the page-aligned middle of large writes with ``O_DIRECT`` from one background thread
    (the page cache costs kernel time for every byte), through a few page-aligned buffers that
    bound the memory in flight; ``flush`` waits for the queue and raises the first error."""

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
    """A file written with ``pwrite`` from any thread; with a ``DirectWriter``, the aligned middle of
    large writes goes around the page cache (where the file system allows ``O_DIRECT``)."""

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
    """A file that chunks append to in chunk order (``ticket`` 0, 1, 2, ...) from any thread: every
    ticket appends exactly once, possibly nothing."""

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
    """Ask glibc to keep freed memory in the heap (the chunks' arrays of tens of MB would otherwise
    be fresh mmap()s, page-faulted in for every chunk) and for one malloc arena. Call it before
    starting threads; a no-op where glibc is not the C library."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_top_pad, m_mmap_threshold, m_arena_max = -1, -2, -3, -8  # glibc's malloc.h
    libc.mallopt(m_arena_max, ctypes.c_int(1))
    libc.mallopt(m_mmap_threshold, ctypes.c_int(1 << 30))
    libc.mallopt(m_trim_threshold, ctypes.c_int(2**31 - 1))
    libc.mallopt(m_top_pad, ctypes.c_int(256 << 20))
