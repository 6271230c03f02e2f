"""Counting the traces of jitted functions, by name, with JAX's own monitoring events."""

import collections
import contextlib

import jax

TRACE_EVENT = "/jax/core/compile/jaxpr_trace_duration"  # recorded by JAX each time a jitted function traces


@contextlib.contextmanager
def count_traces():
    """Counts the traces of jitted functions inside the block by function name (JAX's monitoring events)."""
    counter = collections.Counter()

    def listener(event, duration, fun_name="", **kw):
        if event == TRACE_EVENT:
            counter[fun_name] += 1

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield counter
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
