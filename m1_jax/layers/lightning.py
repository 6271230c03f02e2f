"""Lightning attention layer (70 of M1's 80 layers): linear attention with a fixed per-head decay.

Data path (docs/model.md §2.4): ``u = SiLU(h @ W_qkv)`` reshaped head-major to q | k | v per head, the
lightning op (``S_t = e^-s S_{t-1} + k_t^T v_t``, ``o_t = q_t S_t``, fp32 state), an RMSNorm over all
heads jointly (eps 1e-6), a sigmoid gate from the same ``h``, and the output projection.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from m1_jax import sharding
from m1_jax.config import M1Config
from m1_jax.layers.common import adapter_of, matmul, weight, weights_of
from m1_jax.layers.norms import RMSNorm
from m1_jax.quant.spec import QuantConfig
from pallas_kernels.lightning import lightning_attention, lightning_decode_step


def sharded_lightning(q, k, v, slopes, state, segment_ids, block_size: int, impl: str):
    """The lightning op; under an active mesh it runs per shard of (batch, heads) in ``jax.shard_map``.

    Heads are independent in the recurrence, so the sharded op is exact. The explicit shard_map keeps a
    Pallas kernel (an opaque custom call to XLA's partitioner) from being gathered onto every device.
    """
    mesh = sharding.active_mesh()
    op = lambda q, k, v, s, st, seg: lightning_attention(q, k, v, s, initial_state=st, segment_ids=seg,
                                                         block_size=block_size, impl=impl)
    if mesh is None:
        return op(q, k, v, slopes, state, segment_ids)
    B, _, H, _ = q.shape
    qs = sharding.spec(("batch", "length", "heads", "head_dim"), q.shape)
    ss = sharding.spec(("batch", "heads", None, None), (B, H, 1, 1))
    specs = (qs, qs, qs, sharding.spec(("heads",), (H,)),
             None if state is None else ss, None if segment_ids is None else sharding.spec(("batch", "length")))
    return jax.shard_map(op, mesh=mesh, in_specs=specs, out_specs=(qs, ss), check_vma=False)(
        q, k, v, slopes, state, segment_ids)


class LightningAttention(nnx.Module):
    def __init__(self, cfg: M1Config, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32,
                 impl: str = "auto", quantize: QuantConfig | None = None):
        D, H, d = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim
        std = cfg.initializer_range
        self.cfg = cfg
        self.dtype = dtype
        self.impl = impl
        # qkv_proj rows are head-major interleaved: head h owns [q_h | k_h | v_h] (3 * head_dim).
        qin, qout = ({}, {}) if quantize is None or not quantize.attention else ({"contracted": 1}, {"contracted": 2})
        kw = dict(dtype=param_dtype, std=std)
        self.qkv_proj, self.qkv_proj_scale = weight(rngs, (D, H, 3 * d), ("embed", "heads", None), **kw, **qin)
        self.output_gate, self.output_gate_scale = weight(rngs, (D, H, d), ("embed", "heads", "head_dim"), **kw, **qin)
        self.norm = RMSNorm((H, d), ("heads", "head_dim"), eps=cfg.lightning_norm_eps, dtype=dtype,
                            param_dtype=param_dtype)
        self.out_proj, self.out_proj_scale = weight(rngs, (H, d, D), ("heads", "head_dim", "embed"), **kw, **qout)

    def __call__(self, h: jax.Array, slopes: jax.Array, *, segment_ids: jax.Array | None = None,
                 state: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """``h`` [batch, time, hidden] -> (output [batch, time, hidden], final fp32 state)."""
        q, k, v = self._qkv(h)
        o, final_state = sharded_lightning(q, k, v, slopes, state, segment_ids, self.cfg.block_size, self.impl)
        return self._output(h, o), final_state

    def decode(self, h: jax.Array, slopes: jax.Array, state: jax.Array) -> tuple[jax.Array, jax.Array]:
        """One token per row through the recurrence: ``h`` [batch, 1, hidden] -> (output, new state)."""
        q, k, v = self._qkv(h)
        o, new_state = lightning_decode_step(state, q[:, 0], k[:, 0], v[:, 0], slopes)
        return self._output(h, o[:, None]), new_state

    def _qkv(self, h: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        d = self.cfg.head_dim
        qkv = jax.nn.silu(self._project(h, "qkv_proj"))  # [B, T, H, 3d]
        return qkv[..., :d], qkv[..., d:2 * d], qkv[..., 2 * d:]

    def _output(self, h: jax.Array, o: jax.Array) -> jax.Array:
        o = self.norm(o.astype(self.dtype))
        gate = jax.nn.sigmoid(self._project(h, "output_gate"))
        return self._project(gate * o, "out_proj", contract=2)

    def _project(self, x: jax.Array, name: str, contract: int = 1) -> jax.Array:
        w, scale = weights_of(self, name)
        return matmul(x, w, contract=contract, dtype=self.dtype, scale=scale, lora=adapter_of(self, name))
