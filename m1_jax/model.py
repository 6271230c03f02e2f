"""MiniMax-M1 as a Flax NNX module: token ids -> float32 logits.

Embedding (no scaling) -> ``num_periods`` repetitions of the layer period (scanned, parameters
stacked on a leading ``layers`` axis) -> final RMSNorm -> untied output head (the norm and the head in the
compute dtype or ``head_dtype``, accumulated and returned in float32).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from m1_jax import sharding
from m1_jax.cache import Cache, CacheLayers, CacheStep
from m1_jax.config import LINEAR, M1Config
from m1_jax.layers.common import param
from m1_jax.layers.decoder import Period
from m1_jax.layers.norms import RMSNorm, rms_normalize
from m1_jax.lora.adapters import add_adapters
from m1_jax.quant.spec import resolve as resolve_quantize
from pallas_kernels.lightning import m1_slopes


# Rematerialisation policies of one layer period (``M1Model.run_layers(remat=)``).
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ModelOutput:
    """What :meth:`M1Model.forward` returns, with or without a cache."""

    logits: jax.Array                # float32 [batch, time (1 with last_only), vocab]
    aux_loss_per_layer: jax.Array    # float32 [layers]: MoE load-balancing loss of each layer
    layer_outputs: jax.Array | None  # [layers, batch, time, hidden] with ``collect``, else None
    cache: Cache | None              # the updated cache when one was passed, else None

    @property
    def aux_loss(self) -> jax.Array:
        """The load-balancing loss averaged over layers (what the train loss adds)."""
        return jnp.mean(self.aux_loss_per_layer)


@functools.lru_cache(maxsize=32)
def period_slopes(cfg: M1Config) -> np.ndarray:
    """float32 [num_periods, period, heads]: decay slopes by *global* layer index (zeros for softmax layers)."""
    P, H, L = cfg.period, cfg.num_attention_heads, cfg.num_hidden_layers
    out = np.zeros((cfg.num_periods, P, H), np.float32)
    for layer in range(L):
        if cfg.layer_types[layer] == LINEAR:
            out[layer // P, layer % P] = m1_slopes(H, layer, L)
    return out


def _floating_dtype(head_dtype) -> np.dtype:
    try:
        dt = jnp.dtype(head_dtype)
    except TypeError:
        dt = None
    if dt is None or not jnp.issubdtype(dt, jnp.floating):
        raise ValueError(f"head_dtype must be None (the compute dtype) or a floating dtype such as jnp.float32, "
                         f"got {head_dtype!r}")
    return dt


class M1Model(nnx.Module):
    """MiniMax-M1 / Text-01 causal language model.

    ``dtype`` is the compute dtype, ``param_dtype`` the storage dtype (router gates stay float32).
    ``moe_impl``: the routed experts' grouped matmul, ``"auto"`` (per backend), ``"ragged"`` or
    ``"chunked"``, or ``"dense"`` (the reference; :mod:`m1_jax.layers.moe`). ``lightning_impl`` is
    passed to :func:`pallas_kernels.lightning.lightning_attention`. ``scan_layers=False`` runs the
    stacked periods one by one in Python (same numbers, slower compile).

    ``head_dtype``: the dtype of the final norm and of the output head's matmul inputs (the norm's output and
    the head weight); ``None`` is the compute dtype. ``jnp.float32`` runs the norm and the head in full float32 (highest matmul
    precision on every backend) on top of a bf16 model, as the MiniMax-M1 report does in RL so that the
    sampler's and the trainer's log-probs agree. The logits are float32 either way.

    ``quantize``: ``"int8"`` or a :class:`m1_jax.quant.QuantConfig`: the experts' weights (and with
    ``QuantConfig(attention=True)`` the attention projections) stored in int8 with per-output-channel scales
    (:mod:`m1_jax.quant`); ``m1_jax.quant.quantize_model`` quantizes a model's weights.

    ``lora``: a :class:`m1_jax.lora.LoraConfig`: LoRA adapters on its targets (B zero: the model computes what
    it computes without them until they are trained); ``m1_jax.lora.add_adapters`` adds them to a model.
    """

    def __init__(self, cfg: M1Config, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32,
                 moe_impl: str = "auto", lightning_impl: str = "auto", scan_layers: bool = True,
                 head_dtype=None, quantize=None, lora=None):
        self.cfg = cfg
        self.lora = None  # the LoraConfig once adapters are added (m1_jax.lora.add_adapters)
        self.quantize = resolve_quantize(quantize)
        self.dtype = dtype
        self.head_dtype = None if head_dtype is None else _floating_dtype(head_dtype)
        self.scan_layers = scan_layers
        self.mesh = None  # a jax.sharding.Mesh once placed with m1_jax.sharding.shard_model / from_pretrained(mesh=)
        D, V = cfg.hidden_size, cfg.vocab_size
        self.embed_tokens = param(rngs, (V, D), ("vocab", "embed"), dtype=param_dtype, std=cfg.initializer_range)
        kw = dict(dtype=dtype, param_dtype=param_dtype, moe_impl=moe_impl, lightning_impl=lightning_impl,
                  quantize=self.quantize)

        @nnx.split_rngs(splits=cfg.num_periods)
        @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_periods(r):
            return Period(cfg, rngs=r, **kw)

        self.periods = make_periods(rngs)
        self.norm = RMSNorm((D,), ("embed",), eps=cfg.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)
        self.lm_head = param(rngs, (D, V), ("embed", "vocab"), dtype=param_dtype, std=cfg.initializer_range)
        if lora is not None:
            add_adapters(self, lora, rngs)

    # ------------------------------------------------------------------ pieces
    def embed(self, input_ids: jax.Array) -> jax.Array:
        x = jnp.take(self.embed_tokens[...], input_ids, axis=0).astype(self.dtype)
        return sharding.constrain(x, sharding.HIDDEN)

    def logits(self, x: jax.Array) -> jax.Array:
        """float32 logits of hidden states ``x``: the final norm and the head in the compute dtype, or both in
        ``head_dtype`` when it is set (class docstring)."""
        if self.head_dtype is None:
            z = self.norm(x)
            out = jnp.dot(z, self.lm_head[...].astype(self.dtype), preferred_element_type=jnp.float32)
        else:
            hd = self.head_dtype
            # The norm too: its output is the head's input, which a compute-dtype norm would round first.
            z = self.norm.weight[...].astype(hd) * rms_normalize(x.astype(hd), self.norm.eps)
            # float32 in full: TPUs and GPUs would otherwise run float32 matmuls in bf16 / tf32 passes
            precision = jax.lax.Precision.HIGHEST if hd == jnp.float32 else None
            out = jnp.dot(z, self.lm_head[...].astype(hd), precision=precision, preferred_element_type=jnp.float32)
        return sharding.constrain(out, sharding.LOGITS)

    def run_layers(self, x: jax.Array, *, positions: jax.Array, segment_ids: jax.Array | None = None,
                   moe_impl: str | None = None, scan: bool | None = None, collect: bool = False,
                   cache: CacheLayers | None = None, step: CacheStep | None = None, remat: str = "none"):
        """All decoder layers -> ``(x, per-layer outputs [layers, ...] or None, aux loss per layer [layers],
        updated cache layers or None)``.

        ``remat`` rematerialises each layer period in the backward pass (:data:`REMAT_POLICIES`):
        ``"none"`` keeps all activations, ``"full"`` only the period's input, ``"dots"`` /
        ``"dots_no_batch"`` also the matmul outputs (``jax.checkpoint_policies``).

        With ``cache`` (:attr:`m1_jax.cache.Cache.layers`, stacked per period like the parameters) and
        ``step`` (:class:`m1_jax.cache.CacheStep`) the scan walks the lightning states with the weights and
        carries the keys and values of all softmax layers, which each layer updates and reads in place
        (slicing a layer's KV cache out of the stack and back would copy it whole at every step)."""
        cfg = self.cfg
        slopes = jnp.asarray(period_slopes(cfg))
        graphdef, state = nnx.split(self.periods)
        # With a cache the keys and values of all softmax layers ride in the carry and each layer updates its
        # slice in place; the small lightning states go period by period with the weights.
        states, kv = (None, None) if cache is None else (cache[0], cache[1:])

        def body(carry, xs):
            x, kv = carry
            st, sl, c, p = xs
            c = None if kv is None else (c, *kv, p)
            x, outs, aux, c = nnx.merge(graphdef, st)(x, positions=positions, slopes=sl, segment_ids=segment_ids,
                                                      moe_impl=moe_impl, collect=collect, cache=c, step=step)
            return (x, None if c is None else c[1:]), (outs, aux, None if c is None else c[0])

        if remat not in REMAT_POLICIES:
            raise ValueError(f"remat must be one of {', '.join(REMAT_POLICIES)}, got {remat!r}")
        if remat != "none":
            body = jax.checkpoint(body, policy=REMAT_POLICIES[remat], prevent_cse=False)
        periods = jnp.arange(cfg.num_periods, dtype=jnp.int32)
        if self.scan_layers if scan is None else scan:
            (x, kv), (outs, aux, states) = jax.lax.scan(body, (x, kv), (state, slopes, states, periods))
        else:
            ys = []
            for i in range(cfg.num_periods):
                (x, kv), y = body((x, kv), jax.tree.map(lambda a: a[i], (state, slopes, states, periods)))
                ys.append(y)
            outs, aux, states = jax.tree.map(lambda *a: jnp.stack(a), *ys)
        cache = None if cache is None else (states, *kv)
        flat = lambda a: a.reshape((cfg.num_hidden_layers,) + a.shape[2:])
        return x, (flat(outs) if collect else None), flat(aux), cache

    # ------------------------------------------------------------------ forward
    def forward(self, input_ids: jax.Array, *, positions: jax.Array | None = None,
                segment_ids: jax.Array | None = None, cache: Cache | None = None, n_valid: jax.Array | None = None,
                last_only: bool = False, moe_impl: str | None = None, scan: bool | None = None,
                collect: bool = False, remat: str = "none") -> ModelOutput:
        """The one forward pass: ``input_ids`` int [batch, time] -> :class:`ModelOutput`.

        Without ``cache``: ``positions`` (default ``arange(time)``) feed the rotary embedding;
        ``segment_ids`` mark packed documents (0 = padding): lightning states reset and softmax attention
        stays within a document.

        With ``cache`` (:class:`m1_jax.cache.Cache`) the tokens continue each row of the cache: the first
        ``n_valid[b]`` tokens of row ``b`` are real (default: all), the rest is padding that touches
        nothing; positions follow the cache lengths, and ``ModelOutput.cache`` is the updated cache.

        ``last_only`` computes the logits only at each row's last real token (``[batch, 1, vocab]``;
        a row without a real token gets the logits of token 0, to be ignored). ``remat``: see
        :meth:`run_layers`; ``collect`` keeps every layer's output in ``ModelOutput.layer_outputs``.
        """
        input_ids = jnp.asarray(input_ids)
        if input_ids.ndim != 2 or not jnp.issubdtype(input_ids.dtype, jnp.integer):
            raise ValueError(f"input_ids must be an integer array [batch, time], got {input_ids.dtype}"
                             f"{list(input_ids.shape)}")
        B, T = input_ids.shape
        step = None
        if cache is not None:
            if positions is not None or segment_ids is not None:
                raise ValueError("with a cache, positions and segment_ids come from the cache: pass n_valid")
            n_valid = jnp.full((B,), T, jnp.int32) if n_valid is None else jnp.asarray(n_valid, jnp.int32)
            step = CacheStep(cache.lengths, n_valid)
            positions, segment_ids = step.positions(T), step.real(T).astype(jnp.int32)
        elif n_valid is not None:
            raise ValueError("n_valid counts the real tokens fed into a cache: pass a cache too")
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), input_ids.shape)
        if self.mesh is not None:
            sharding.check_batch(B, self.mesh)
        with sharding.activate(self.mesh):
            x = self.embed(input_ids)
            x, outs, aux, layers = self.run_layers(
                x, positions=positions, segment_ids=segment_ids, moe_impl=moe_impl, scan=scan, collect=collect,
                cache=None if cache is None else cache.layers, step=step, remat=remat)
            if last_only:
                last = jnp.full((B,), T - 1, jnp.int32) if n_valid is None else jnp.maximum(n_valid - 1, 0)
                x = x[jnp.arange(B), last][:, None]
            logits = self.logits(x)
        if cache is not None:
            cache = cache.replace(lightning=layers[0], keys=layers[1], values=layers[2],
                                  lengths=cache.lengths + n_valid)
        return ModelOutput(logits=logits, aux_loss_per_layer=aux, layer_outputs=outs, cache=cache)

    def __call__(self, input_ids: jax.Array, *, positions: jax.Array | None = None,
                 segment_ids: jax.Array | None = None, last_only: bool = False, moe_impl: str | None = None,
                 scan: bool | None = None, remat: str = "none") -> jax.Array:
        """``input_ids`` int [batch, time] -> float32 logits [batch, time, vocab]: ``forward(...).logits``
        (arguments as :meth:`forward`; a cache goes to :meth:`forward`, which returns it).

        Called with concrete arrays it runs compiled: one XLA program per model structure, input shapes and
        options, kept by ``jax.jit``'s cache, so calling it again with the same shapes compiles nothing.
        Inside a transformation (``jax.jit``, ``nnx.grad``, ...: an input or a parameter is a tracer) it is
        traced into the caller's program instead."""
        kw = dict(positions=positions, segment_ids=segment_ids, last_only=last_only, moe_impl=moe_impl, scan=scan,
                  remat=remat)
        if _traced(self, (input_ids, positions, segment_ids)):
            return self.forward(input_ids, **kw).logits
        arrays = {k: kw.pop(k) for k in ("positions", "segment_ids")}
        return _compiled_logits(self, jnp.asarray(input_ids), **arrays, **kw)


def _traced(model: M1Model, arrays) -> bool:
    """Whether any input or parameter is a tracer (the call is inside a JAX transformation)."""
    return any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves((nnx.state(model), arrays)))


@functools.partial(nnx.jit, static_argnames=("last_only", "moe_impl", "scan", "remat"))
def _compiled_logits(model: M1Model, input_ids: jax.Array, *, positions=None, segment_ids=None, last_only=False,
                     moe_impl=None, scan=None, remat="none") -> jax.Array:
    return model.forward(input_ids, positions=positions, segment_ids=segment_ids, last_only=last_only,
                         moe_impl=moe_impl, scan=scan, remat=remat).logits


def init_model(cfg: M1Config, *, seed: int = 0, **kw) -> M1Model:
    """A randomly initialised model (weights N(0, initializer_range), norms 1)."""
    return M1Model(cfg, rngs=nnx.Rngs(seed), **kw)


def abstract_model(cfg: M1Config, **kw) -> M1Model:
    """The model with ``jax.ShapeDtypeStruct`` leaves: shapes and shardings, no weights allocated."""
    return nnx.eval_shape(lambda: M1Model(cfg, rngs=nnx.Rngs(0), **kw))
