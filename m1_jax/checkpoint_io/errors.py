"""The one error for checkpoints that cannot be read, written or restored as asked, and what turns the
errors of the libraries below (the OS, TensorStore, Orbax) into its one-line messages."""

from __future__ import annotations

import errno
import sys
import traceback

# errno values of a device that has no room left: no space, or the user's quota spent
_FULL = (errno.ENOSPC, errno.EDQUOT)


class CheckpointError(ValueError):
    """A checkpoint (a source directory, a converted one or a training checkpoint) that cannot be read,
    written or restored as asked; the message names the directory, file or key."""


def cause(e: BaseException) -> BaseException:
    """The innermost exception ``e`` was raised from (Orbax wraps TensorStore's error in a generic one)."""
    while e.__cause__ is not None or (e.__context__ is not None and not e.__suppress_context__):
        e = e.__cause__ or e.__context__
    return e


def cause_line(e: BaseException) -> str:
    """The innermost cause of ``e`` on one line: its type and the first line of its message."""
    e = cause(e)
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:300]}" if text else type(e).__name__


def is_disk_full(e: BaseException) -> bool:
    """Whether ``e`` (or what it was raised from) says the device is full: an ``OSError`` with ENOSPC or
    EDQUOT, or TensorStore's error for one (a ``ValueError`` naming the OS error code)."""
    while e is not None:
        if isinstance(e, OSError) and e.errno in _FULL:
            return True
        if isinstance(e, ValueError) and any(f"os_error_code='{code}'" in str(e) for code in _FULL):
            return True
        e = e.__cause__ or (None if e.__suppress_context__ else e.__context__)
    return False


def _is_abandoned_read(exc_type, exc, tb) -> bool:
    """asyncio's ``RuntimeError('Event loop is closed')`` from ``call_soon_threadsafe``: a read that
    finished after the event loop that started it was closed."""
    return (exc_type is RuntimeError and str(exc) == "Event loop is closed"
            and any(f.name == "call_soon_threadsafe" for f in traceback.extract_tb(tb)))


def ignore_abandoned_reads() -> None:
    """Stops the reports of reads abandoned by a failed Orbax restore.

    Orbax runs a restore in an event loop of its own and closes it as soon as one read fails; the reads
    still in flight then complete into the closed loop, and TensorStore reports each one as an unraisable
    "Event loop is closed" traceback (hundreds for a damaged checkpoint) next to the one error that
    matters. This wraps ``sys.unraisablehook`` (once per process) to drop exactly those reports; every
    other report is passed on unchanged."""
    if getattr(sys.unraisablehook, "drops_abandoned_reads", False):
        return
    previous = sys.unraisablehook

    def hook(report):
        if not _is_abandoned_read(report.exc_type, report.exc_value, report.exc_traceback):
            previous(report)

    hook.drops_abandoned_reads = True
    sys.unraisablehook = hook
