"""What a request to the serving engine holds and what the engine reports back."""

from __future__ import annotations

import dataclasses
import itertools
import secrets
import threading
import time
from typing import Callable

# Why a request ended, in OpenAI's words ("abort": cancelled, e.g. its client went away or the server stops).
STOP, LENGTH, ABORT = "stop", "length", "abort"

_ids = itertools.count()


class RequestError(ValueError):
    """A request the engine refuses; ``param`` names the offending field, ``status`` the HTTP status."""

    def __init__(self, message: str, *, param: str | None = None, status: int = 400,
                 kind: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.param, self.status, self.kind, self.code = param, status, kind, code


class QueueFull(RequestError):
    def __init__(self, waiting: int, retry_after: float):
        super().__init__(f"the server is busy: {waiting} requests are already waiting; retry later",
                         status=429, kind="rate_limit_error", code="queue_full")
        self.retry_after = retry_after


@dataclasses.dataclass(frozen=True)
class SamplingOptions:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()  # end the request (not part of its text): the eos ids
    logprobs: int | None = None           # top log-probabilities per token (0: the chosen token's only)


@dataclasses.dataclass
class TokenEvent:
    """One generated token: its id, the text that became final with it ('' while held back), its
    log-probability and, when asked, the top alternatives as (id, log-probability)."""

    token: int
    text: str
    logprob: float
    top: list[tuple[int, float]] | None
    stop_token: bool = False  # an eos id: it ends the request and is not part of the text


@dataclasses.dataclass
class DoneEvent:
    finish_reason: str
    text: str           # the last piece of text (held back until the end), '' if none
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    error: str | None = None  # set when the engine failed rather than the request ending


@dataclasses.dataclass(eq=False)
class Request:
    """A prompt (token ids) and its options; ``on_event`` receives :class:`TokenEvent` s then one
    :class:`DoneEvent`, called from the engine's thread."""

    prompt: list[int]
    options: SamplingOptions
    on_event: Callable[[object], None]
    id: int = dataclasses.field(default_factory=lambda: next(_ids))
    arrived: float = dataclasses.field(default_factory=time.monotonic)
    _cancelled: threading.Event = dataclasses.field(default_factory=threading.Event, repr=False)

    def cancel(self) -> None:
        """Ends the request at the next step boundary (finish reason ``abort``); its slot is freed."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()


def new_seed() -> int:
    """A random sampling seed for a request that gives none."""
    return secrets.randbits(63)
