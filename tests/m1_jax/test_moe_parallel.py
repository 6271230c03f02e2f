"""Expert-parallel MoE (shard_map + all-to-all) against the dense reference, on the 8-device CPU mesh."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from m1_jax import sharding
from m1_jax.layers.experts import experts_dense
from m1_jax.layers.moe import MoE
from m1_jax.layers.moe_parallel import experts_sharded, padded_ragged_all_to_all
from tiny_models import tiny_config

TOL = 1e-5
B, T, D, E, I, K = 8, 5, 16, 4, 12, 2


@pytest.fixture(scope="module")
def problem():
    rng = np.random.default_rng(7)
    f = lambda *s: jnp.asarray(rng.normal(size=s) * 0.3, jnp.float32)
    # Uneven routing: expert 0 takes most pairs, expert 3 none.
    p = np.array([0.7, 0.2, 0.1, 0.0])
    experts = np.stack([rng.choice(E, size=K, replace=False, p=p) for _ in range(B * T)]).reshape(B, T, K)
    counts = np.bincount(experts.reshape(-1), minlength=E)
    assert counts[3] == 0 and counts[0] > counts[1:].max()
    return dict(x=jnp.asarray(rng.normal(size=(B, T, D)), jnp.float32),
                w=jnp.asarray(rng.uniform(0.1, 1.0, size=(B, T, K)), jnp.float32),
                experts=jnp.asarray(experts, jnp.int32), w1=f(E, D, I), w3=f(E, D, I), w2=f(E, I, D))


def _dense(x, w, experts, w1, w3, w2):
    out = experts_dense(x.reshape(-1, D), w.reshape(-1, K), experts.reshape(-1, K), w1, w3, w2, jnp.float32)
    return out.reshape(x.shape)


@pytest.mark.parametrize("spec, chunk, grouped", [
    ("data=8", 2048, "chunked"), ("fsdp=2,expert=2,tensor=2", 2048, "chunked"),
    ("expert=4,tensor=2", 4, "chunked"),  # every ep | E; chunked routing
    ("fsdp=2,expert=2,tensor=2", 2048, "ragged")])  # both grouped matmuls
def test_shard_map_moe_equals_dense_uneven_routing(problem, spec, chunk, grouped):
    mesh = sharding.make_mesh(spec)
    ex = problem["experts"]
    args = (problem["x"], problem["w"], problem["w1"], problem["w3"], problem["w2"])
    sharded = lambda x, w, w1, w3, w2: experts_sharded(x, w, ex, w1, w3, w2, jnp.float32, mesh=mesh,
                                                       chunk_tokens=chunk, grouped=grouped)
    dense = lambda x, w, w1, w3, w2: _dense(x, w, ex, w1, w3, w2)
    # a loss that weighs every output element differently, so gradients see every row
    probe = jax.random.normal(jax.random.key(1), (B, T, D))
    loss = lambda f: (lambda *a: jnp.sum(jnp.sin(f(*a)) * probe))
    out, grads = jax.jit(lambda *a: (sharded(*a), jax.grad(loss(sharded), argnums=range(5))(*a)))(*args)
    ref, ref_grads = jax.jit(lambda *a: (dense(*a), jax.grad(loss(dense), argnums=range(5))(*a)))(*args)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=TOL, atol=TOL)
    for name, g, r in zip(("x", "weights", "w1", "w3", "w2"), grads, ref_grads):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=TOL, atol=TOL, err_msg=name)


def test_padded_exchange_matches_ragged_all_to_all_semantics():
    """The CPU stand-in for ragged_all_to_all against a numpy model of its documented semantics."""
    mesh = sharding.make_mesh("expert=4,data=2")
    rng = np.random.default_rng(3)
    ep, m, cap = 4, 6, 24
    send = rng.integers(0, 3, size=(8, ep))  # per device (data-major order), rows sent to each peer
    operand = rng.normal(size=(8, m, 2)).astype(np.float32)
    spec = jax.sharding.PartitionSpec(("data", "expert"))

    def body(operand, send):
        operand, send = operand[0], send[0]
        matrix = jax.lax.all_gather(send, "expert")  # [src, dst]
        me = jax.lax.axis_index("expert")
        in_off = jnp.cumsum(send) - send
        out_off = (jnp.cumsum(matrix, axis=0) - matrix)[me]
        recv = matrix[:, me]
        out = padded_ragged_all_to_all(operand, jnp.full((cap, 2), -1.0), in_off, send, out_off, recv,
                                       axis_name="expert")
        return out[None]

    got = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(spec, spec), out_specs=spec))(
        jnp.asarray(operand), jnp.asarray(send, jnp.int32))
    got = np.asarray(got)
    for g in range(2):  # data groups: devices g*ep .. g*ep+ep-1 exchange among themselves
        for dst in range(ep):
            expect = np.full((cap, 2), -1.0, np.float32)
            pos = 0
            for src in range(ep):
                s = send[g * ep + src]
                start = s[:dst].sum()
                expect[pos:pos + s[dst]] = operand[g * ep + src, start:start + s[dst]]
                pos += s[dst]
            np.testing.assert_array_equal(got[g * ep + dst], expect)


def test_moe_module_under_mesh_and_aux_loss():
    """The MoE layer picks the expert-parallel path under a mesh; outputs, router logits and the
    load-balancing loss equal the unsharded layer."""
    cfg = tiny_config()  # 4 experts, 2 per token
    moe = MoE(cfg, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(2), (8, 6, cfg.hidden_size))
    ref, ref_logits, ref_aux = moe(x)
    dense, _, _ = moe(x, impl="dense")
    np.testing.assert_allclose(np.asarray(ref), np.asarray(dense), rtol=TOL, atol=TOL)
    mesh = sharding.make_mesh("data=2,expert=4")
    graphdef, state = nnx.split(moe)

    @jax.jit
    def run(state, x):
        return nnx.merge(graphdef, state)(x)

    with sharding.activate(mesh):  # JAX's mesh context, set around the jit call
        out, logits, aux = run(state, x)
        assert "shard_map" in str(jax.make_jaxpr(run)(state, x))
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=TOL, atol=TOL)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(ref_logits), rtol=TOL, atol=TOL)
    np.testing.assert_allclose(float(aux), float(ref_aux), rtol=TOL)
    # the loss is E * sum_e f_e P_e over all tokens of all shards
    probs = jax.nn.softmax(ref_logits.reshape(-1, 4), axis=-1)
    top = jax.lax.top_k(probs, 2)[1].reshape(-1)
    f = np.bincount(np.asarray(top), minlength=4) / probs.shape[0]
    np.testing.assert_allclose(float(aux), 4 * float(np.sum(f * np.asarray(probs.mean(0)))), rtol=TOL)


def test_expert_axis_must_divide_experts(problem):
    mesh = sharding.make_mesh("expert=8")
    with pytest.raises(sharding.MeshError, match="expert=8 does not divide num_local_experts=4"):
        experts_sharded(problem["x"], problem["w"], problem["experts"], problem["w1"], problem["w3"],
                        problem["w2"], jnp.float32, mesh=mesh)


def test_chunking_splits_tokens_evenly():
    from m1_jax.layers.moe_parallel import _num_chunks

    assert _num_chunks(10, 4) == 5 and _num_chunks(8192, 2048) == 4 and _num_chunks(7, 100) == 1
    assert _num_chunks(13, 4) == 13  # prime: one token per chunk rather than an uneven split
