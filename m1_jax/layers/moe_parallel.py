"""Expert parallelism: the routed expert computation inside ``jax.shard_map`` with all-to-all exchange.

Experts are split over the ``expert`` mesh axis (``E / ep`` per shard), tokens over the batch axes
(``data``, ``fsdp``, ``expert``) and the expert width over ``tensor``. Per device:

1. sort the local (token, slot) pairs by expert; the rows for expert shard ``j`` are then one
   contiguous run of ``send[j]`` rows;
2. exchange the runs over ``expert`` (``jax.lax.ragged_all_to_all`` on TPU; elsewhere, where XLA has
   no ragged all-to-all, :func:`padded_ragged_all_to_all` gives the same result from a dense
   ``all_to_all`` of worst-case-sized chunks);
3. regroup the received rows by local expert and run the SwiGLU experts as grouped matmuls
   (:func:`m1_jax.layers.experts.swiglu_grouped`, ``ragged_dot`` or chunked);
4. send the results back the same way, weight them and add them into their tokens; with
   ``tensor > 1`` the partial sums over the expert width are reduced with ``psum``.

Dropless: the receive buffer holds the worst case (every token of every expert shard routed here:
``ep * tokens * top_k`` rows), so no routing, however uneven, loses a token. The result equals the
dense reference exactly up to float summation order. To bound those buffers a device routes its
tokens in chunks of at most ``chunk_tokens`` (rematerialised in the backward pass).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from m1_jax import sharding
from m1_jax.layers.expert_chunks import chunk_rows
from m1_jax.layers.experts import combine, experts_grouped, grouped_impl, sort_by_expert, swiglu_grouped
from pallas_kernels.platform import targeting_tpu

EXPERT = "expert"
# Tokens per device routed at once: the receive buffer is ep * CHUNK_TOKENS * top_k rows.
CHUNK_TOKENS = 2048


def _exclusive_cumsum(x, axis=-1):
    return jnp.cumsum(x, axis=axis) - x


def padded_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *,
                             axis_name: str):
    """``jax.lax.ragged_all_to_all`` semantics from a dense ``all_to_all`` (for backends without it).

    Rows ``[input_offsets[j], input_offsets[j] + send_sizes[j])`` of ``operand`` go to device ``j``
    and land in its ``output`` at ``output_offsets[j]`` (an offset chosen by the sender);
    ``recv_sizes[i]`` rows arrive from device ``i``. Each chunk travels padded to ``operand``'s length.
    """
    m = operand.shape[0]
    rows = jnp.arange(m)
    idx = jnp.clip(input_offsets[:, None] + rows[None, :], 0, m - 1)  # [ep, m]
    valid = rows[None, :] < send_sizes[:, None]
    chunks = jnp.where(valid[..., None], operand[idx], jnp.zeros((), operand.dtype))  # [ep, m, ...]
    recv = jax.lax.all_to_all(chunks, axis_name, 0, 0, tiled=True)  # recv[i]: chunk from device i
    offsets = jax.lax.all_to_all(output_offsets, axis_name, 0, 0, tiled=True)  # where device i put it
    target = offsets[:, None] + rows[None, :]
    target = jnp.where(rows[None, :] < recv_sizes[:, None], target, output.shape[0])  # padding: dropped
    return output.at[target.reshape(-1)].set(recv.reshape((-1,) + operand.shape[1:]), mode="drop")


def _num_chunks(n: int, chunk_tokens: int) -> int:
    """Fewest chunks of at most ``chunk_tokens`` tokens that split ``n`` evenly (1 if none does)."""
    for c in range(-(-n // max(chunk_tokens, 1)), n + 1):
        if n % c == 0:
            return c
    return 1


def _local_experts(x, weights, experts, w1, w3, w2, scales, adapters, *, num_experts: int, ep: int, tensor: int,
                   dtype, ragged: bool, grouped: str, chunk_tokens: int, lora_scale: float):
    """Per-device body. x [b, T, D]; weights/experts [b, T, k]; w1/w3 [E/ep, D, I/t]; w2 [E/ep, I/t, D];
    ``scales`` of int8 weights (s1/s3 [E/ep, I/t], s2 [E/ep, D]) or None; ``adapters``: LoRA (A, B) or None
    per weight (A1/A3 [E/ep, D, r], B1/B3 [E/ep, r, I/t], A2 [E/ep, I/t, r], B2 [E/ep, r, D]) or None,
    scaled by ``lora_scale``.

    The local tokens are processed in chunks of at most ``chunk_tokens`` (``lax.map`` over rematerialised
    chunks): the worst-case buffers scale with the chunk, not with all tokens of the device."""
    b, T, D = x.shape
    k = experts.shape[-1]
    n = b * T
    args = (x.reshape(n, D), weights.reshape(n, k), experts.reshape(n, k))
    lora = None if adapters is None else (adapters, lora_scale)
    routed = functools.partial(_routed, w1=w1, w3=w3, w2=w2, scales=scales, lora=lora, num_experts=num_experts,
                               ep=ep, dtype=dtype, ragged=ragged, grouped=grouped)
    c = _num_chunks(n, chunk_tokens)
    if c == 1:
        out = routed(*args)
    else:
        chunks = [a.reshape((c, n // c) + a.shape[1:]) for a in args]
        out = jax.lax.map(jax.checkpoint(lambda a: routed(*a)), chunks).reshape(n, D)
    if tensor > 1:
        out = jax.lax.psum(out, "tensor")
    return out.reshape(b, T, D)


def _routed(x, weights, experts, *, w1, w3, w2, scales, lora, num_experts: int, ep: int, dtype, ragged: bool,
            grouped: str):
    """x [n, D], weights/experts [n, k] -> [n, D] (partial over ``tensor`` when the width is split)."""
    if ep == 1:  # all experts are local
        return experts_grouped(x, weights, experts, w1, w3, w2, dtype, grouped, scales=scales, lora=lora)
    n, D = x.shape
    k = experts.shape[-1]
    xs, counts, order = sort_by_expert(x, experts, num_experts, dtype)  # xs [n*k, D]; counts [E]
    e_loc = num_experts // ep
    me = jax.lax.axis_index(EXPERT)
    all_counts = jax.lax.all_gather(counts, EXPERT)  # [src, E]
    matrix = all_counts.reshape(ep, ep, e_loc).sum(-1)  # rows sent [src, dst]
    send = matrix[me]  # [dst]
    in_offsets = _exclusive_cumsum(send)
    recv = matrix[:, me]  # [src]
    recv_offsets = _exclusive_cumsum(recv)
    out_offsets = _exclusive_cumsum(matrix, axis=0)[me]  # where my run lands on each dst
    back_offsets = _exclusive_cumsum(matrix, axis=1)[:, me]  # where src's run started in src's rows
    cap = ep * n * k  # worst case: every row of every shard comes here
    if ragged:
        exchange = functools.partial(jax.lax.ragged_all_to_all, axis_name=EXPERT)
    else:
        exchange = functools.partial(padded_ragged_all_to_all, axis_name=EXPERT)
    buf = exchange(xs, jnp.zeros((cap, D), dtype), in_offsets, send, out_offsets, recv)
    # Local expert of every received row: runs from each source, each sorted by expert.
    local_counts = jax.lax.dynamic_slice_in_dim(all_counts, me * e_loc, e_loc, axis=1)  # [src, E/ep]
    p = jnp.arange(cap)
    src = jnp.searchsorted(jnp.cumsum(recv), p, side="right")  # == ep for padding rows
    src_c = jnp.minimum(src, ep - 1)
    r = p - recv_offsets[src_c]
    e = jnp.sum(jnp.cumsum(local_counts, axis=1)[src_c] <= r[:, None], axis=1)
    e = jnp.where(src < ep, e, e_loc)
    perm = jnp.argsort(e, stable=True)
    # ``cap`` rows is the worst case; on average n * k rows arrive: chunks sized for that.
    y_sorted = swiglu_grouped(buf[perm], local_counts.sum(0), w1, w3, w2, dtype, grouped, chunk_rows(n * k, e_loc),
                              scales=scales, lora=lora)
    y_recv = jnp.zeros_like(y_sorted).at[perm].set(y_sorted)
    y = exchange(y_recv, jnp.zeros((n * k, D), dtype), recv_offsets, recv, back_offsets, send)
    return combine(y, weights, order, dtype)


def experts_sharded(x, weights, experts, w1, w3, w2, dtype, mesh: Mesh | None = None, ragged: bool | None = None,
                    chunk_tokens: int = CHUNK_TOKENS, grouped: str | None = None, scales=None, lora=None):
    """The routed experts over ``mesh`` (default: the active mesh). x [B, T, D]; weights/experts
    [B, T, k]; w1/w3 [E, D, I]; w2 [E, I, D] -> [B, T, D].

    ``ragged``: use ``jax.lax.ragged_all_to_all`` (default: when tracing for TPU,
    :func:`pallas_kernels.platform.targeting_tpu`).
    ``chunk_tokens``: tokens per device exchanged at once (bounds the worst-case buffers).
    ``grouped``: the grouped matmul, one of :data:`m1_jax.layers.experts.GROUPED` (default
    :func:`m1_jax.layers.experts.grouped_impl`).
    ``scales``: (s1 [E, I], s3 [E, I], s2 [E, D]) float32 per-output-channel scales of int8 weights, sharded
    like the weights' expert and output axes (:mod:`m1_jax.layers.experts`).
    ``lora``: (adapters, alpha / rank), adapters None or (A [E, in, r], B [E, r, out]) per weight, sharded on
    the expert axis (and B1 / B3 and A2 on the expert width like the weights) (:mod:`m1_jax.layers.experts`).
    """
    mesh = mesh or sharding.active_mesh()
    E = w1.shape[0]
    ep, t = mesh.shape[EXPERT], mesh.shape["tensor"]
    if E % ep:
        raise sharding.MeshError(f"mesh {sharding.format_mesh_spec(mesh)}: expert={ep} does not divide "
                                 f"num_local_experts={E}")
    if ragged is None:
        ragged = targeting_tpu()
    grouped = grouped or grouped_impl()
    with sharding.activate(mesh):
        tok = sharding.spec(("batch", "length", None), x.shape)
        w_in = sharding.spec(("experts", None, "mlp"), w1.shape)
        w_out = sharding.spec(("experts", "mlp", None), w2.shape)
        s_specs = None if scales is None else (sharding.spec(("experts", "mlp"), scales[0].shape),
                                               sharding.spec(("experts", "mlp"), scales[1].shape),
                                               sharding.spec(("experts", None), scales[2].shape))
        adapters, lora_scale = (None, 1.0) if lora is None else (tuple(lora[0]), float(lora[1]))
        # A of w1 / w3 [E, D, r] and B of w2 [E, r, D]: whole per expert; B of w1 / w3 [E, r, I] and A of w2
        # [E, I, r]: split on the width like the weights (w2's partial sums are reduced with its output).
        ab_axes = ((("experts", None, None), ("experts", None, "mlp")),) * 2 + ((("experts", "mlp", None),
                                                                                  ("experts", None, None)),)
        a_specs = None if adapters is None else tuple(
            None if ab is None else tuple(sharding.spec(ax, v.shape) for ax, v in zip(axes, ab))
            for ab, axes in zip(adapters, ab_axes))
    body = functools.partial(_local_experts, num_experts=E, ep=ep, tensor=t, dtype=dtype, ragged=ragged,
                             grouped=grouped, chunk_tokens=chunk_tokens, lora_scale=lora_scale)
    return jax.shard_map(body, mesh=mesh, in_specs=(tok, tok, tok, w_in, w_in, w_out, s_specs, a_specs),
                         out_specs=tok)(x, weights, experts, w1, w3, w2, scales, adapters)
