"""Lightning attention: token-recurrence reference, chunked XLA, Pallas TPU and GPU kernels, decode step.

Public API:
  lightning_attention(q, k, v, slopes, *, initial_state=None, segment_ids=None,
                      block_size=256, impl="auto") -> (o, final_state)
  lightning_decode_step(state, q, k, v, slopes, *, impl="auto") -> (o, new_state)
  m1_slopes(num_heads, layer_idx, num_layers) -> np.ndarray float32 [num_heads]

Tracing for a TPU or GPU target from another host: `pallas_kernels.platform.tpu_target()` /
`gpu_target()`.
"""

from pallas_kernels.lightning.decode import lightning_decode_step
from pallas_kernels.lightning.op import IMPLS, lightning_attention, resolve_impl
from pallas_kernels.lightning.slopes import alibi_slopes, m1_slopes

__all__ = [
    "IMPLS",
    "alibi_slopes",
    "lightning_attention",
    "lightning_decode_step",
    "m1_slopes",
    "resolve_impl",
]
