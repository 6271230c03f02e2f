"""Public API: validation, dispatch, decode step."""

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels.lightning import lightning_attention, lightning_decode_step, resolve_impl
from pallas_kernels.platform import tpu_target


def test_validation_errors():
    q = jnp.ones((1, 5, 2, 4))
    s = jnp.ones((2,))
    with pytest.raises(ValueError, match="impl must be one of"):
        lightning_attention(q, q, q, s, impl="cuda")
    with pytest.raises(ValueError, match="block_size"):
        lightning_attention(q, q, q, s, block_size=0)
    with pytest.raises(ValueError, match="slopes"):
        lightning_attention(q, q, q, jnp.ones((3,)))
    with pytest.raises(ValueError, match="k shape"):
        lightning_attention(q, jnp.ones((1, 5, 2, 3)), q, s)
    with pytest.raises(ValueError, match="initial_state"):
        lightning_attention(q, q, q, s, initial_state=jnp.ones((1, 2, 4, 5)))
    with pytest.raises(ValueError, match="segment_ids"):
        lightning_attention(q, q, q, s, segment_ids=jnp.ones((1, 4), jnp.int32))
    with pytest.raises(ValueError, match="segment_ids must be integers"):
        lightning_attention(q, q, q, s, segment_ids=jnp.ones((1, 5)))
    with pytest.raises(ValueError, match="q must be"):
        lightning_attention(q[0], q[0], q[0], s)
    with pytest.raises(ValueError, match="state"):
        lightning_decode_step(jnp.ones((1, 2, 4, 3)), q[:, 0], q[:, 0], q[:, 0], s)


def test_auto_dispatch():
    want = "pallas" if jax.default_backend() in ("tpu", "gpu") else "xla"
    assert resolve_impl("auto") == want
    with tpu_target():
        assert resolve_impl("auto") == "pallas"
    assert resolve_impl("reference") == "reference"


def test_decode_step_matches_reference_one_token(lt):
    q, k, v, s0, _, _ = lt.make_inputs(22, 2, 1, 4, 8)
    slopes = jnp.asarray(lt.SLOPES[:4])
    o_ref, s_ref = lightning_attention(q, k, v, slopes, initial_state=s0, impl="reference")
    o, s = lightning_decode_step(s0, q[:, 0], k[:, 0], v[:, 0], slopes)
    assert lt.rel_err(o, o_ref[:, 0]) < 1e-6 and lt.rel_err(s, s_ref) < 1e-6


def test_empty_time():
    q = jnp.ones((1, 0, 2, 4))
    o, s = lightning_attention(q, q, q, jnp.ones((2,)))
    assert o.shape == (1, 0, 2, 4) and s.shape == (1, 2, 4, 4)
