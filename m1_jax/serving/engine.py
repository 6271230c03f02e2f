"""The serving engine: a fixed number of slots decoded together, requests admitted and freed at step
boundaries, prompts prefilled in chunks between decode steps, and an exact prefix cache.

One thread runs the loop (:meth:`Engine.start`); any thread submits (:meth:`Engine.submit`) and cancels
(:meth:`Request.cancel`). Each iteration

1. drops cancelled requests (their slots are free for this iteration's admissions);
2. admits waiting requests while a slot and a prefill row are free: the prefill row is reset, or set to
   the longest cached prefix of the prompt (:mod:`m1_jax.serving.prefix_cache`);
3. feeds one chunk of every admitted prompt (:func:`steps._prefill_chunk`); a prompt whose last chunk is
   in moves into its slot (:func:`steps.insert`) and decodes from the next step on;
4. runs one decode step over all slots (:func:`steps._decode_step`) and hands each running request its
   token; a request that ends (an eos id, a stop string, ``max_tokens``, the context full) frees its slot.

Shapes depend only on the slots, the context and the chunk size, so nothing compiles while serving
(prefill chunks come in power-of-two lengths up to the chunk size: a handful of compiles on first use).
"""

from __future__ import annotations

import atexit
import collections
import dataclasses
import threading
import time
import weakref
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from m1_jax import sharding
from m1_jax.cache import init_cache, round_max_len
from m1_jax.serving import steps
from m1_jax.serving.prefix_cache import Entry, PrefixCache, block_hashes
from m1_jax.serving.requests import (
    ABORT,
    LENGTH,
    STOP,
    DoneEvent,
    QueueFull,
    Request,
    RequestError,
    SamplingOptions,
    TokenEvent,
)
from m1_jax.serving.text import StopStrings
from m1_jax.tokenizer import StreamDecoder


@dataclasses.dataclass
class EngineConfig:
    slots: int = 8                # requests decoded together (the decode batch)
    max_context: int = 4096       # prompt + generated tokens per request (rounded up: cache.round_max_len)
    prefill_chunk: int = 256      # prompt tokens fed per request per iteration; also the prefix-cache block
    prefix_cache_bytes: int = 0   # memory budget of the prefix cache (0: off)
    max_queue: int = 256          # waiting requests beyond which submissions are refused (HTTP 429)
    prefill_rows: int | None = None  # prompts prefilled side by side (default: 4, or the mesh's batch shards
    #                                  if more; a multiple of them)

    def check(self, cfg, mesh) -> None:
        for name in ("slots", "max_context", "prefill_chunk", "max_queue"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if self.prefill_chunk < 16 or self.prefill_chunk & (self.prefill_chunk - 1):
            raise ValueError(f"prefill_chunk must be a power of two >= 16, got {self.prefill_chunk}")
        if self.prefix_cache_bytes < 0:
            raise ValueError(f"prefix_cache_bytes must be >= 0, got {self.prefix_cache_bytes}")
        if self.max_context > cfg.max_position_embeddings:
            raise ValueError(f"max_context={self.max_context} exceeds the model's max_position_embeddings="
                             f"{cfg.max_position_embeddings}")
        shards = batch_shards(mesh)
        if self.slots % shards:
            raise ValueError(f"slots={self.slots} must be a multiple of the mesh's batch shards "
                             f"(data*fsdp*expert={shards})")
        if self.prefill_rows is not None and (self.prefill_rows < 1 or self.prefill_rows % shards):
            raise ValueError(f"prefill_rows={self.prefill_rows} must be a positive multiple of the mesh's "
                             f"batch shards (data*fsdp*expert={shards})")


DEFAULT_PREFILL_ROWS = 4


def _stop_at_exit(ref) -> None:
    engine = ref()
    if engine is not None:
        engine.stop(timeout=60)


def default_prefill_rows(mesh) -> int:
    """:data:`DEFAULT_PREFILL_ROWS` rounded up to a multiple of the mesh's batch shards."""
    shards = batch_shards(mesh)
    return shards * -(-DEFAULT_PREFILL_ROWS // shards)


def batch_shards(mesh) -> int:
    """How many ways the mesh splits the batch (data * fsdp * expert; 1 without a mesh)."""
    return 1 if mesh is None else sharding.axis_size(mesh, sharding.BATCH_AXES)


@dataclasses.dataclass
class _Prefill:
    request: Request
    row: int
    slot: int
    pos: int = 0          # prompt tokens in the prefill row
    cached: int = 0       # of which restored from the prefix cache
    hashes: list = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class _Running:
    request: Request
    slot: int
    cached: int
    decoder: StreamDecoder
    stops: StopStrings
    seeds: tuple[int, int]
    next_token: int = 0   # the last token sampled: fed at the next decode step
    generated: int = 0
    first_token_at: float | None = None


def _seed_halves(seed: int) -> tuple[int, int]:
    return seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF


def _bucket(n: int, cap: int) -> int:
    return min(cap, max(16, 1 << (n - 1).bit_length()))


class Engine:
    """Serves ``model`` (an :class:`m1_jax.M1Model`, sharded when it has a mesh) to concurrent requests.

    ``tokenizer`` turns generated ids into text (stop strings, streaming); ``metrics``: an optional
    :class:`m1_jax.serving.metrics.Metrics`."""

    def __init__(self, model, tokenizer, config: EngineConfig | None = None, *, metrics=None):
        cfg, mesh = model.cfg, model.mesh
        self.config = config = config or EngineConfig()
        config.check(cfg, mesh)
        self.model_config, self.tokenizer, self.metrics = cfg, tokenizer, metrics
        self.max_len = round_max_len(config.max_context)
        self.context = min(self.max_len, cfg.max_position_embeddings)
        self.chunk = config.prefill_chunk
        self.rows = config.prefill_rows or default_prefill_rows(mesh)
        self.graphdef, self.params = nnx.split(model)
        self.model_steps = steps.for_model(self.graphdef)
        S, V = config.slots, cfg.vocab_size
        self.cache = init_cache(cfg, S, self.max_len, dtype=model.dtype, mesh=mesh, round_len=False)
        self.pcache = init_cache(cfg, self.rows, self.max_len, dtype=model.dtype, mesh=mesh, round_len=False)
        self.plogits = self._zeros((self.rows, V), mesh)
        self.prefix = PrefixCache(self.chunk, config.prefix_cache_bytes)
        self._waiting: collections.deque[Request] = collections.deque()
        self._jobs: list[_Prefill | None] = [None] * self.rows
        self._slots: list[_Running | None] = [None] * S
        self._reserved: set[int] = set()
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._inflight: tuple | None = None  # (runs by slot, device outputs) of the decode step not yet read
        self._sampled = jnp.zeros((S,), jnp.int32)  # the tokens the last decode step sampled (on the device)
        self.error: BaseException | None = None
        self._finish_times: collections.deque[float] = collections.deque(maxlen=64)
        self.steps = 0

    @staticmethod
    def _zeros(shape, mesh):
        if mesh is None:
            return jnp.zeros(shape, jnp.float32)
        return jnp.zeros(shape, jnp.float32, device=sharding.named_sharding(("batch", "vocab"), mesh, shape))

    # ------------------------------------------------------------------------------------ public
    def start(self) -> "Engine":
        """Starts the loop in a daemon thread."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="m1-serve-engine", daemon=True)
            self._thread.start()
            atexit.register(_stop_at_exit, weakref.ref(self))  # never leave a step running as Python exits
        return self

    def stop(self, timeout: float | None = None) -> None:
        """Cancels what is waiting or running (finish reason ``abort``) and ends the loop."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.error is None

    def check(self, prompt: Sequence[int], options: SamplingOptions) -> None:
        """Raises :class:`RequestError` for a request that cannot run (the message gives the numbers)."""
        n = len(prompt)
        if n == 0:
            raise RequestError("the prompt is empty: at least one token is needed", param="prompt")
        V = self.model_config.vocab_size
        bad = [t for t in prompt if not 0 <= t < V]
        if bad:
            raise RequestError(f"prompt token id {bad[0]} is outside the vocabulary [0, {V})", param="prompt")
        if n >= self.context:
            raise RequestError(f"the prompt is {n} tokens long, the context is {self.context} tokens: the "
                               f"prompt must be shorter than the context", param="messages", code="context_length_exceeded")
        if n + options.max_tokens > self.context:
            raise RequestError(f"this model's context is {self.context} tokens; the request asks for "
                               f"{n + options.max_tokens} ({n} in the prompt, max_tokens={options.max_tokens}): "
                               f"lower max_tokens to at most {self.context - n}", param="max_tokens",
                               code="context_length_exceeded")

    def submit(self, request: Request) -> Request:
        """Queues ``request``; raises :class:`RequestError` (bad request) or :class:`QueueFull`."""
        self.check(request.prompt, request.options)
        with self._cv:
            if self._stopping or not self.alive:
                raise RequestError("the server is shutting down" if self._stopping else
                                   f"the engine stopped: {self.error!r}", status=503, kind="server_error")
            waiting = sum(not r.cancelled for r in self._waiting)  # cancelled ones leave at the next step
            if waiting >= self.config.max_queue:
                raise QueueFull(waiting, retry_after=self._retry_after())
            self._waiting.append(request)
            self._cv.notify_all()
        self._gauge()
        return request

    def generate(self, prompts: Sequence[Sequence[int]], options: SamplingOptions | Sequence[SamplingOptions],
                 timeout: float | None = None) -> list[dict]:
        """Submits ``prompts`` together and waits: per prompt ``{"tokens", "logprobs", "text",
        "finish_reason", "cached_tokens"}`` (for tools and tests; the server streams instead)."""
        opts = [options] * len(prompts) if isinstance(options, SamplingOptions) else list(options)
        results = [dict(tokens=[], logprobs=[], text="", finish_reason=None, cached_tokens=0) for _ in prompts]
        done = threading.Semaphore(0)

        def sink(i):
            def on_event(ev):
                r = results[i]
                if isinstance(ev, TokenEvent):
                    r["tokens"].append(ev.token)
                    r["logprobs"].append(ev.logprob)
                    r["text"] += ev.text
                else:
                    r["text"] += ev.text
                    r.update(finish_reason=ev.finish_reason, cached_tokens=ev.cached_tokens, error=ev.error)
                    done.release()
            return on_event

        for i, (p, o) in enumerate(zip(prompts, opts)):
            self.submit(Request(list(p), o, sink(i)))
        for _ in prompts:
            if not done.acquire(timeout=timeout):
                raise TimeoutError(f"no answer within {timeout} s")
        return results

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return sum(r is not None for r in self._slots)

    # ------------------------------------------------------------------------------------ the loop
    def _loop(self) -> None:
        try:
            while True:
                with self._cv:
                    while not (self._stopping or self._waiting or self._busy()):
                        self._cv.wait()
                    if self._stopping:
                        break
                self._iteration()
        except BaseException as e:  # a failed step ends every request: report it rather than hang them
            self.error = e
        finally:
            self._abort_all(None if self.error is None else f"the engine stopped: {self.error!r}")

    def _busy(self) -> bool:
        return (any(j is not None for j in self._jobs) or any(r is not None for r in self._slots)
                or self._inflight is not None)

    def _iteration(self) -> None:
        self._drop_cancelled()
        self._admit()
        if any(j is not None for j in self._jobs):
            self._prefill()
        # the next decode step is dispatched before the last one's tokens are read back: the device computes
        # step k + 1 while the host hands out the tokens of step k (its tokens never leave the device to
        # be fed); a request that ended at step k wasted one row of step k + 1, which is dropped
        done, self._inflight = self._inflight, None
        if any(r is not None for r in self._slots):
            self._dispatch(done)
        if done is not None:
            self._emit(*done)
        self.steps += 1
        self._gauge()

    def _finish(self, request: Request, reason: str, text: str, completion: int, cached: int,
                error: str | None = None) -> None:
        request.on_event(DoneEvent(reason, text, len(request.prompt), completion, cached, error))
        self._finish_times.append(time.monotonic())
        if self.metrics is not None:
            self.metrics.finished(reason, time.monotonic() - request.arrived)

    def _drop_cancelled(self) -> None:
        with self._cv:
            gone = [r for r in self._waiting if r.cancelled]
            for r in gone:
                self._waiting.remove(r)
        for r in gone:
            self._finish(r, ABORT, "", 0, 0)
        for i, job in enumerate(self._jobs):
            if job is not None and job.request.cancelled:
                self._jobs[i] = None
                self._reserved.discard(job.slot)
                self._finish(job.request, ABORT, "", 0, job.cached)
        for s, run in enumerate(self._slots):
            if run is not None and run.request.cancelled:
                self._slots[s] = None
                self._finish(run.request, ABORT, "", run.generated, run.cached)

    def _free_slot(self) -> int | None:
        for s, run in enumerate(self._slots):
            if run is None and s not in self._reserved:
                return s
        return None

    def _admit(self) -> None:
        while True:
            row = next((i for i, j in enumerate(self._jobs) if j is None), None)
            slot = self._free_slot()
            if row is None or slot is None:
                return
            with self._cv:
                if not self._waiting:
                    return
                request = self._waiting.popleft()
            self._reserved.add(slot)
            job = self._jobs[row] = _Prefill(request, row, slot)
            self._start_prefill(job)

    def _start_prefill(self, job: _Prefill) -> None:
        self.pcache = steps.reset_row(self.pcache, job.row)
        job.hashes = block_hashes(job.request.prompt, self.chunk) if self.prefix.enabled else []
        hits = self.prefix.lookup(job.hashes)
        if hits:
            for j, e in enumerate(hits):
                self.pcache = steps.restore_block(self.pcache, job.row, j * self.chunk, e.keys, e.values)
            job.pos = job.cached = len(hits) * self.chunk
            self.pcache, self.plogits = steps.restore_state(self.pcache, self.plogits, job.row, hits[-1].lightning,
                                                            hits[-1].logits, job.pos)
        if self.metrics is not None:
            self.metrics.admitted(len(job.request.prompt))
            self.metrics.prefix_lookup(len(job.request.prompt), job.cached)

    def _prefill(self) -> None:
        C = self.chunk
        todo = [j for j in self._jobs if j is not None and j.pos < len(j.request.prompt)]
        if todo:
            n = {j.row: min(C, len(j.request.prompt) - j.pos) for j in todo}
            T = _bucket(max(n.values()), C)
            ids = np.zeros((self.rows, T), np.int32)
            n_valid = np.zeros((self.rows,), np.int32)
            for j in todo:
                ids[j.row, :n[j.row]] = j.request.prompt[j.pos:j.pos + n[j.row]]
                n_valid[j.row] = n[j.row]
            self.pcache, self.plogits = self.model_steps.prefill_chunk(self.params, self.pcache, self.plogits, ids,
                                                                       n_valid)
            for j in todo:
                j.pos += n[j.row]
                if self.prefix.enabled and j.pos % C == 0:
                    k = j.pos // C
                    if j.hashes[k - 1] not in self.prefix:
                        snap = steps.snapshot(self.pcache, self.plogits, j.row, j.pos, block=C)
                        self.prefix.put(j.hashes[:k], Entry(*snap))
            if self.metrics is not None:
                self.metrics.prefilled(int(n_valid.sum()))
        ready = [j for j in self._jobs if j is not None and j.pos == len(j.request.prompt)]
        if not ready:
            return
        runs = {}
        for j in ready:
            self._jobs[j.row] = None
            self._reserved.discard(j.slot)
            o = j.request.options
            runs[j.row] = self._slots[j.slot] = _Running(j.request, j.slot, j.cached, StreamDecoder(self.tokenizer),
                                                         StopStrings(o.stop), _seed_halves(o.seed))
        # the first token comes from the prompt's last logits, right away
        self._emit(runs, steps.sample(self.plogits, *self._sampling_rows(runs, self.rows)))
        for row, run in runs.items():
            if self._slots[run.slot] is run:  # not ended by its first token
                self.cache = steps.insert(self.cache, self.pcache, row, run.slot)

    def _sampling_rows(self, runs: dict, n: int, index: dict | None = None):
        """Per-row sampling arrays of ``runs`` (row -> _Running) over ``n`` rows; ``index``: the index of the
        token each row samples (default: the number of tokens it has)."""
        temperature, top_p = np.zeros((n,), np.float32), np.ones((n,), np.float32)
        top_k, counters = np.zeros((n,), np.int32), np.zeros((n,), np.int32)
        seeds = np.zeros((n, 2), np.uint32)
        for r, run in runs.items():
            o = run.request.options
            temperature[r], top_p[r], top_k[r] = o.temperature, o.top_p, o.top_k
            seeds[r] = run.seeds
            counters[r] = run.generated if index is None else index[r]
        return temperature, top_k, top_p, seeds, counters

    def _emit(self, runs: dict, sampled) -> None:
        """Hands each run (row -> _Running) its sampled token (from the device outputs ``sampled``)."""
        tok, lp, top_ids, top_lp = sampled
        want_top = any(r.request.options.logprobs for r in runs.values())
        tok, lp = jax.device_get((tok, lp))
        if want_top:
            top_ids, top_lp = jax.device_get((top_ids, top_lp))
        now = time.monotonic()
        runs = {r: run for r, run in runs.items() if self._slots[run.slot] is run}  # ended or cancelled since
        for r, run in runs.items():
            self._token(run, int(tok[r]), float(lp[r]),
                        list(zip(top_ids[r].tolist(), top_lp[r].tolist())) if want_top else None, now)
        if self.metrics is not None:
            self.metrics.decoded(len(runs))

    def _dispatch(self, previous: tuple | None) -> None:
        """Starts a decode step over the running slots (not waiting for it). A run that was in the previous
        step feeds the token that step sampled, still on the device; a run fresh from its prefill feeds its
        first token."""
        S = len(self._slots)
        last = previous[0] if previous is not None else {}
        runs = {s: run for s, run in enumerate(self._slots) if run is not None}
        active, tokens, chained = np.zeros((S,), bool), np.zeros((S,), np.int32), np.zeros((S,), bool)
        counters = {}
        for s, run in runs.items():
            active[s] = True
            chained[s] = last.get(s) is run
            tokens[s] = run.next_token
            counters[s] = run.generated + int(chained[s])  # the index of the token this step samples
        temperature, top_k, top_p, seeds, count = self._sampling_rows(runs, S, counters)
        self.cache, *sampled = self.model_steps.decode_step(self.params, self.cache, tokens, self._sampled, chained,
                                                            active, temperature, top_k, top_p, seeds, count)
        self._sampled = sampled[0]
        self._inflight = (runs, sampled)

    def _token(self, run: _Running, token: int, logprob: float, top, now: float) -> None:
        req, o = run.request, run.request.options
        run.generated += 1
        run.next_token = token
        if run.first_token_at is None:
            run.first_token_at = now
            if self.metrics is not None:
                self.metrics.first_token(now - req.arrived)
        eos = token in o.stop_token_ids
        text = "" if eos else run.stops.feed(run.decoder.push(token))
        reason = None
        if eos or run.stops.stopped is not None:
            reason = STOP
        elif run.generated >= o.max_tokens or len(req.prompt) + run.generated >= self.context:
            reason = LENGTH
        n_top = o.logprobs or 0
        req.on_event(TokenEvent(token, text, logprob, top[:n_top] if (top is not None and n_top) else None,
                                stop_token=eos))
        if reason is None:
            return
        tail = "" if run.stops.stopped is not None else run.stops.feed(run.decoder.flush()) + run.stops.flush()
        self._slots[run.slot] = None
        if self.metrics is not None and run.generated > 1:
            self.metrics.per_token((now - run.first_token_at) / (run.generated - 1))
        self._finish(req, reason, tail, run.generated, run.cached)

    def _abort_all(self, error: str | None) -> None:
        with self._cv:
            waiting, self._waiting = list(self._waiting), collections.deque()
        for r in waiting:
            self._finish(r, ABORT, "", 0, 0, error)
        for i, j in enumerate(self._jobs):
            if j is not None:
                self._jobs[i] = None
                self._finish(j.request, ABORT, "", 0, j.cached, error)
        self._reserved.clear()
        for s, run in enumerate(self._slots):
            if run is not None:
                self._slots[s] = None
                self._finish(run.request, ABORT, "", run.generated, run.cached, error)

    # ------------------------------------------------------------------------------------ metrics
    def _retry_after(self) -> float:
        """Seconds until the queue has likely moved on: the waiting requests over the recent finish rate
        (1 to 60 s; 1 s before any request has finished)."""
        times = self._finish_times
        if len(times) < 2 or times[-1] <= times[0]:
            return 1.0
        rate = (len(times) - 1) / (times[-1] - times[0])
        return float(min(60.0, max(1.0, len(self._waiting) / rate)))

    def _gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.load(self.waiting, self.running, self.prefix)

