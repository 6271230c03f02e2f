"""The Pallas kernel's own options (layouts, heads per grid step) and TPU block rule; the cases it shares
with the chunked XLA path are in test_lightning_impls.py."""

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels.lightning import lightning_attention
from pallas_kernels.lightning.pallas_tpu import lightning_pallas


@pytest.mark.parametrize("layout,head_tile", [("packed", 2)])
def test_pallas_layouts_and_head_tiles(lt, layout, head_tile):
    # the default tests use the head-major layout with one head per grid step
    b, t, h, d = 1, 24, 4, 8
    q, k, v, s0, do, ds = lt.make_inputs(31 + head_tile, b, t, h, d)
    seg = lt.packed_segments(b, t, 5)
    slopes = jnp.asarray(lt.SLOPES[:h])

    def f(impl_fn):
        def run(q, k, v, s0):
            (o, st), vjp = jax.vjp(impl_fn, q, k, v, s0)
            return (o, st) + tuple(vjp((do, ds)))

        return jax.jit(run)(q, k, v, s0)

    ref = f(
        lambda q, k, v, s0: lightning_attention(q, k, v, slopes, initial_state=s0, segment_ids=seg, impl="reference")
    )
    got = f(
        lambda q, k, v, s0: lightning_pallas(
            q, k, v, slopes, s0, seg, 16, interpret=True, layout=layout, head_tile=head_tile
        )
    )
    for name, a, r in zip(lt.NAMES, got, ref):
        assert lt.rel_err(a, r) < 1e-5, name


def test_pallas_tpu_block_rule():
    q = jnp.ones((1, 8, 1, 128))
    with pytest.raises(ValueError, match="multiple of 128"):
        lightning_pallas(q, q, q, jnp.ones((1,)), jnp.zeros((1, 1, 128, 128)), None, 64, interpret=False)
