"""Host buffers for conversion: page-aligned (direct I/O can use them) and reused under a byte limit."""

from __future__ import annotations

import contextlib
import mmap
import threading

import numpy as np

PAGE = mmap.PAGESIZE


def aligned_empty(nbytes: int) -> np.ndarray:
    """An uninitialised uint8 array of ``nbytes`` starting on a page boundary (an anonymous mapping)."""
    return np.frombuffer(mmap.mmap(-1, max(nbytes, 1)), np.uint8)[:nbytes]


class BufferPool:
    """Reusable page-aligned host buffers, at most ``limit`` bytes allocated in all (idle ones included).

    Reading every tensor into a fresh allocation costs a page fault per 4 KiB; reusing buffers does
    not. A request larger than ``limit`` is served when no other buffer exists, so one tensor of any
    size can always proceed.
    """

    def __init__(self, limit: int):
        self.limit, self.allocated = limit, 0
        self.idle: list[np.ndarray] = []
        self.cond = threading.Condition()

    @contextlib.contextmanager
    def take(self, nbytes: int):
        with self.cond:
            while True:
                fits = [i for i, b in enumerate(self.idle) if b.nbytes >= nbytes]
                if fits:
                    buf = self.idle.pop(min(fits, key=lambda i: self.idle[i].nbytes))
                    break
                while self.idle and self.allocated + nbytes > self.limit:
                    self.allocated -= self.idle.pop(0).nbytes
                if self.allocated + nbytes <= self.limit or self.allocated == 0:
                    self.allocated += nbytes
                    buf = None
                    break
                self.cond.wait()
        if buf is None:
            try:
                buf = aligned_empty(nbytes)
            except BaseException:
                with self.cond:
                    self.allocated -= nbytes
                    self.cond.notify_all()
                raise
        try:
            yield buf[:nbytes]
        finally:
            with self.cond:
                self.idle.append(buf)
                self.cond.notify_all()
