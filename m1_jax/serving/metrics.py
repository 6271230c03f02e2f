"""Prometheus metrics of the serving engine (``GET /metrics``), one registry per server."""

from __future__ import annotations

import collections
import threading
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_PER_TOKEN = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


class Metrics:
    """What the engine reports: load, tokens, latencies and the prefix cache (names prefixed ``m1_``)."""

    WINDOW_S = 10.0  # tokens/s is measured over this many recent seconds

    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.queue = Gauge("m1_queue_requests", "requests waiting for a slot", registry=r)
        self.running_slots = Gauge("m1_running_slots", "slots decoding a request", registry=r)
        self.prompt_tokens = Counter("m1_prompt_tokens", "prompt tokens received", registry=r)
        self.prefill_tokens = Counter("m1_prefill_tokens", "prompt tokens computed (not restored)", registry=r)
        self.cached_tokens = Counter("m1_prefix_cache_hit_tokens", "prompt tokens restored from the prefix cache",
                                     registry=r)
        self.generated = Counter("m1_generation_tokens", "tokens generated", registry=r)
        self.tokens_per_s = Gauge("m1_generation_tokens_per_second", "tokens generated per second, last 10 s",
                                  registry=r)
        self.hit_rate = Gauge("m1_prefix_cache_hit_rate", "share of prompt tokens restored from the prefix cache",
                              registry=r)
        self.prefix_bytes = Gauge("m1_prefix_cache_bytes", "bytes held by the prefix cache", registry=r)
        self.ttft = Histogram("m1_time_to_first_token_seconds", "arrival to first generated token",
                              buckets=_LATENCY, registry=r)
        self.tpot = Histogram("m1_time_per_output_token_seconds", "mean time between a request's tokens",
                              buckets=_PER_TOKEN, registry=r)
        self.latency = Histogram("m1_request_latency_seconds", "arrival to the end of a request", buckets=_LATENCY,
                                 registry=r)
        self.requests = Counter("m1_requests", "requests ended, by finish reason", ["finish_reason"], registry=r)
        self._recent: collections.deque[tuple[float, int]] = collections.deque()
        self._lock = threading.Lock()
        self._prompt = self._hit = 0

    # the engine's hooks
    def load(self, waiting: int, running: int, prefix) -> None:
        self.queue.set(waiting)
        self.running_slots.set(running)
        self.prefix_bytes.set(prefix.bytes)
        self._rate()

    def prefix_lookup(self, prompt: int, cached: int) -> None:
        self.cached_tokens.inc(cached)
        with self._lock:
            self._prompt += prompt
            self._hit += cached
            self.hit_rate.set(self._hit / self._prompt if self._prompt else 0.0)

    def admitted(self, prompt: int) -> None:
        self.prompt_tokens.inc(prompt)

    def prefilled(self, tokens: int) -> None:
        self.prefill_tokens.inc(tokens)

    def decoded(self, tokens: int) -> None:
        self.generated.inc(tokens)
        with self._lock:
            self._recent.append((time.monotonic(), tokens))
        self._rate()

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def per_token(self, seconds: float) -> None:
        self.tpot.observe(seconds)

    def finished(self, reason: str, seconds: float) -> None:
        self.requests.labels(finish_reason=reason).inc()
        self.latency.observe(seconds)

    def _rate(self) -> None:
        now = time.monotonic()
        with self._lock:
            while self._recent and self._recent[0][0] < now - self.WINDOW_S:
                self._recent.popleft()
            self.tokens_per_s.set(sum(n for _, n in self._recent) / self.WINDOW_S)

    def exposition(self) -> bytes:
        """The text format Prometheus scrapes."""
        return generate_latest(self.registry)
