"""The publish protocol of every script: claim (lock) an output folder, stage, publish by renames, settle."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import json
import logging
import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from utils.cli import InputError, Terminated

logger = logging.getLogger("cell2sentence")


def check_can_write(output_dir: Path, names: Sequence[str], *, overwrite: bool) -> None:
    """Fail before any work when an output exists and ``--overwrite`` was not given."""
    found = [output_dir / name for name in names if (output_dir / name).exists()]
    if found and not overwrite:
        shown = ", ".join(str(p) for p in found[:3])
        raise InputError(f"The output folder already holds results ({shown}); "
                         "pass --overwrite to replace them or choose another --output_dir.")


LOCK_NAME = ".c2s-lock"
STAGING_PREFIX = ".staging-"
PUBLISH_PREFIX = ".publish-"
TRASH_PREFIX = ".trash-"
_NAMES_FILE = ".names.json"  # inside a staging folder: the outputs in publish order
_OLD_DIR = ".old"  # inside a .publish-* folder: the outputs being replaced


class _Hold(NamedTuple):
    fd: int
    created: list[Path]  # folders this run made, deepest first (removed again when left empty)


_HELD: dict[Path, _Hold] = {}  # the output folders this process holds


class FolderInUse(InputError):
    """The folder is locked by another live run, process ``holder``."""

    def __init__(self, message: str, holder: str) -> None:
        super().__init__(message)
        self.holder = holder


def _unwritable(folder: Path, err: OSError) -> InputError:
    """One sentence for a folder that cannot be written."""
    if err.errno == errno.ENOSPC:
        return disk_full_error(folder)
    reason = {errno.EROFS: "it is on a read-only file system", errno.EACCES: "permission denied",
              errno.EPERM: "permission denied"}.get(err.errno or 0, err.strerror or str(err))
    return InputError(f"Cannot write to the output folder {folder} ({reason}); choose another output folder.")


def disk_full_error(folder: Path, *, staged: bool = True) -> InputError:
    """The sentence for a full disk under ``folder`` (``staged``: what failed was staged, now removed)."""
    free = "unknown"
    with contextlib.suppress(OSError):
        free = f"{shutil.disk_usage(_missing(Path(folder))[1]).free / 2**20:,.1f} MiB"
    return InputError(f"The disk holding {folder} is full ({free} free)"
                      + ("; nothing was written: " if staged else ": ")
                      + "free some space or choose an output folder on another disk.")


def is_disk_full(err: BaseException) -> bool:
    """Whether ``err`` (or what caused it) is a full disk, as the OS, h5py or torch say it."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno == errno.ENOSPC:
            return True
        if "No space left on device" in str(current) or "errno = 28" in str(current):
            return True
        current = current.__cause__ or current.__context__
    return False


def _missing(folder: Path) -> tuple[list[Path], Path]:
    """The folders of ``folder``'s path that do not exist, deepest first, and the first that does."""
    missing, probe = [], folder
    while not probe.exists() and probe != probe.parent:
        missing.append(probe)
        probe = probe.parent
    return missing, probe


def _lock(folder: Path) -> int:
    """An exclusive ``flock`` on ``folder``'s lock file (released by the OS when the process dies)."""
    path = folder / LOCK_NAME
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise _unwritable(folder, err) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise FolderInUse(f"The output folder {folder} is in use by another run (process {holder}); wait "
                              "for it to finish or choose another output folder.", holder) from None
        except OSError as err:  # a file system without locks (some NFS mounts)
            logger.warning("Cannot lock %s (%s); concurrent runs into it are not detected.", folder, err)
        try:
            # The run before us may have removed the file between our open and our lock.
            if os.fstat(fd).st_ino == path.stat().st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:  # the holder for the message above; also a probe that files can be written
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except OSError as err:
        os.close(fd)
        raise _unwritable(folder, err) from None
    return fd


def claim_output_dir(output_dir: Path, names: Sequence[str] = (), *, overwrite: bool = True) -> None:
    """Create and lock ``output_dir``, settle what earlier runs left, check that ``names`` may be written."""
    output_dir = Path(output_dir)
    key = output_dir.resolve()
    if key not in _HELD:
        created, probe = _missing(output_dir)  # the folders this run makes, deepest first
        if probe.exists() and not probe.is_dir():
            what = "is" if probe == output_dir else f"cannot be created: {probe} is"
            raise InputError(f"The output folder {output_dir} {what} a file, not a folder; choose another output "
                             "folder.")
        try:
            output_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise _unwritable(output_dir, err) from None
        try:
            fd = _lock(output_dir)
        except BaseException:
            _remove_empty(created)
            raise
        _HELD[key] = _Hold(fd, created)
        _settle(output_dir)
    check_can_write(output_dir, names, overwrite=overwrite)


def _remove_empty(folders: Sequence[Path]) -> None:
    with contextlib.suppress(OSError):  # stops at the first folder that is not empty
        for folder in folders:
            folder.rmdir()


def release_output_dir(output_dir: Path) -> None:
    """Release this process's hold on ``output_dir`` (removed if this run made it and left it empty)."""
    if (key := Path(output_dir).resolve()) not in _HELD:
        return
    with _signals_wait():  # a Ctrl-C now would leave the lock file behind
        hold = _HELD.pop(key)
        with contextlib.suppress(OSError):
            (Path(output_dir) / LOCK_NAME).unlink()  # while still locked: see _lock
        os.close(hold.fd)
        _remove_empty(hold.created)


def releasing_outputs(main: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate a script's ``main``: the output folders it claimed are released when it ends."""

    @functools.wraps(main)
    def run(*args: Any, **kwargs: Any) -> Any:
        before = set(_HELD)
        try:
            return main(*args, **kwargs)
        except Exception as err:
            # Named while the folder is known: after the release the CLI could only name the cwd.
            held = [f for f in _HELD if f not in before]
            if held and not isinstance(err, InputError) and is_disk_full(err):
                raise disk_full_error(held[0], staged=False) from None
            raise
        finally:
            for folder in [f for f in _HELD if f not in before]:
                release_output_dir(folder)

    return run


def _settle(folder: Path) -> None:
    """Finish the publishes and remove the staging and trash folders dead runs left (lock held)."""
    for committed in _pending_publishes(folder):
        logger.warning("Finishing the publish of outputs that an interrupted run left in %s.", folder)
        _finish_publish(committed, folder)
    for prefix in (STAGING_PREFIX, TRASH_PREFIX):
        for stale in sorted(folder.glob(prefix + "*")):
            logger.warning("Removing %s, left by a run that did not finish.", stale)
            _remove(stale)


def settle_inputs(*paths: Path, wait_s: float = 10.0) -> None:
    """Finish the publishes killed runs left in each of ``paths`` and its parent (a live run's: waited for)."""
    seen: set[Path] = set()
    for path in map(Path, paths):
        for folder in (path, path.parent):
            key = folder.resolve()
            if key not in seen:
                seen.add(key)
                _settle_input(folder, wait_s=wait_s)


def _pending_publishes(folder: Path) -> list[Path]:
    return sorted(folder.glob(PUBLISH_PREFIX + "*")) if folder.is_dir() else []


def _settle_input(folder: Path, *, wait_s: float) -> None:
    pending = _pending_publishes(folder)
    if not pending:
        return
    if folder.resolve() in _HELD:  # this process's own folder: its lock is ours
        _settle(folder)
        return
    if not os.access(folder, os.W_OK | os.X_OK):
        raise InputError(f"{folder} holds outputs whose publish was cut short ({pending[0].name}), and "
                         "this user cannot finish it (the folder is not writable); rerun the step that wrote "
                         "it, or run this once with write access to the folder.")
    deadline = time.monotonic() + wait_s
    while True:
        try:
            claim_output_dir(folder)  # finishes the publish under the folder's lock
            release_output_dir(folder)
            return
        except FolderInUse as err:
            if not _pending_publishes(folder):
                return  # the live run finished its publish meanwhile
            if time.monotonic() >= deadline:
                raise InputError(f"{folder} is being published by another run (process {err.holder}) "
                                 "that has not finished; wait for it to finish and run this again.") from None
            time.sleep(0.1)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def _signals_wait() -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM back for the few renames of a publish, then deliver them."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    arrived: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, _frame: arrived.append(signum))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if arrived:
            raise Terminated() if arrived[0] == signal.SIGTERM else KeyboardInterrupt()


def _finish_publish(committed: Path, folder: Path) -> None:
    """Steps 2-3 of a publish from wherever they stopped: old outputs aside, new ones in."""
    order = committed / _NAMES_FILE
    recorded = json.loads(order.read_text()) if order.is_file() else []
    names, retired = (recorded, []) if isinstance(recorded, list) else (recorded["publish"], recorded["retire"])
    pending = [n for n in names if (committed / n).exists() or (committed / n).is_symlink()]
    old = committed / _OLD_DIR
    old.mkdir(exist_ok=True)
    for name in [*pending, *retired]:  # a name may be nested ("eval/x.csv"): its folders are made as needed
        dst = folder / name
        if dst.exists() or dst.is_symlink():
            if name in retired:
                logger.warning("Removed %s, an output of an earlier run not written now.", dst)
            (old / name).parent.mkdir(parents=True, exist_ok=True)
            dst.rename(old / name)
    for name in reversed(pending):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (committed / name).rename(folder / name)
    trash = folder / (TRASH_PREFIX + committed.name[len(PUBLISH_PREFIX):])
    committed.rename(trash)


def publish_staged(staging: Path, output_dir: Path, names: Sequence[str], *, whole: bool = False) -> list[str]:
    """Move the outputs among ``names`` in ``staging`` into ``output_dir`` by renames, the first name
    last; returns those published. ``whole``: also remove the old ones among ``names`` not staged."""
    present = [n for n in dict.fromkeys(names) if (staging / n).exists() or (staging / n).is_symlink()]
    retired = [n for n in dict.fromkeys(names) if whole and n not in present]
    (staging / _NAMES_FILE).write_text(json.dumps({"publish": present, "retire": retired}))
    suffix = staging.name[len(STAGING_PREFIX):] if staging.name.startswith(STAGING_PREFIX) else staging.name
    committed = output_dir / (PUBLISH_PREFIX + suffix)
    with _signals_wait():
        staging.rename(committed)
        _finish_publish(committed, output_dir)
        _remove(output_dir / (TRASH_PREFIX + suffix))
    return present


@contextlib.contextmanager
def staged_outputs(output_dir: Path, names: Sequence[str], *, overwrite: bool) -> Iterator[Path]:
    """Yield a staging folder, then publish ``names`` (all the step's outputs): all, or on failure none."""
    output_dir = Path(output_dir)
    claim_output_dir(output_dir, names, overwrite=overwrite)
    try:
        try:  # on the destination's file system: the final moves are renames
            tmp = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=output_dir))
        except OSError as err:
            raise _unwritable(output_dir, err) from None
        try:
            yield tmp
            # Another program (not holding the lock) may have written meanwhile.
            check_can_write(output_dir, names, overwrite=overwrite)
            publish_staged(tmp, output_dir, names, whole=True)
        except Exception as err:
            if is_disk_full(err):
                shutil.rmtree(tmp, ignore_errors=True)
                raise disk_full_error(output_dir) from None
            raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        release_output_dir(output_dir)
