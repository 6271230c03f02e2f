"""Stop strings in generated text that arrives in pieces."""

from __future__ import annotations

from typing import Sequence


class StopStrings:
    """Finds the first stop string in text that arrives in pieces.

    :meth:`feed` returns the text that is safe to emit: everything up to a stop string (then
    :attr:`stopped` is set and the rest is dropped), less a tail that could still be the start of one."""

    def __init__(self, stops: Sequence[str]):
        self.stops = tuple(s for s in stops if s)
        self._pending = ""
        self.stopped: str | None = None

    def feed(self, text: str) -> str:
        if self.stopped is not None:
            return ""
        buf = self._pending + text
        if not self.stops:
            self._pending = ""
            return buf
        hits = [(buf.find(s), s) for s in self.stops if s in buf]
        if hits:
            at, s = min(hits)
            self.stopped, self._pending = s, ""
            return buf[:at]
        keep = max((n for s in self.stops for n in range(min(len(s) - 1, len(buf)), 0, -1)
                    if buf.endswith(s[:n])), default=0)
        self._pending = buf[len(buf) - keep:] if keep else ""
        return buf[:len(buf) - keep]

    def flush(self) -> str:
        """The held-back tail at the end of generation (it turned out not to be a stop string)."""
        out, self._pending = self._pending, ""
        return "" if self.stopped is not None else out
