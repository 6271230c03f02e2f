"""The Pallas kernels compile through Mosaic for real TPU targets (AOT, CPU host)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.lightning import lightning_attention
from pallas_kernels.platform import tpu_target

pytest.importorskip("libtpu", reason="libtpu (jax[tpu]) is needed for TPU AOT compilation")


def _abstract_device(topology):
    from jax.experimental import topologies

    try:
        desc = topologies.get_topology_desc(topology_name=topology, platform="tpu")
    except Exception as e:  # noqa: BLE001 - libtpu present but unusable here
        pytest.skip(f"TPU topology {topology} unavailable: {e}")
    return desc.devices[0]


@pytest.mark.parametrize(
    "topology,dtype,head_dim",
    [
        ("v5e:2x2", jnp.bfloat16, 128),
        ("v5p:2x2x1", jnp.float32, 128),
    ],
)
def test_pallas_compiles_for_tpu(topology, dtype, head_dim):
    dev = _abstract_device(topology)
    mesh = jax.sharding.Mesh(np.array([dev]), ("x",))
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    b, t, h, d = 1, 1024, 8, head_dim
    x = jax.ShapeDtypeStruct((b, t, h, d), dtype, sharding=rep)
    s = jax.ShapeDtypeStruct((h,), jnp.float32, sharding=rep)
    s0 = jax.ShapeDtypeStruct((b, h, d, d), jnp.float32, sharding=rep)
    seg = jax.ShapeDtypeStruct((b, t), jnp.int32, sharding=rep)

    def fwd(q, k, v, slopes, s0, seg):
        return lightning_attention(q, k, v, slopes, initial_state=s0, segment_ids=seg, impl="auto")

    def loss(q, k, v, slopes, s0, seg):
        o, st = fwd(q, k, v, slopes, s0, seg)
        return jnp.sum(o.astype(jnp.float32) ** 2) + jnp.sum(st)

    grad = jax.grad(loss, argnums=(0, 1, 2, 4))
    with tpu_target():
        for fn in (fwd, grad):
            compiled = jax.jit(fn).lower(x, x, x, s, s0, seg).compile()
            text = compiled.as_text()
            assert "tpu_custom_call" in text  # real Mosaic kernels, not interpret mode
            cost = compiled.cost_analysis()
            cost = cost[0] if isinstance(cost, (list, tuple)) else cost
            assert cost.get("flops", 0) > 4 * b * h * t * 256 * d  # from pl.CostEstimate
