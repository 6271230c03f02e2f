"""Sharded model on the 8-device CPU mesh: mesh specs, rules, clear errors, and sharded == single device."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import m1_jax
from m1_jax import sharding
from m1_jax.sharding import MeshError

TOL = 1e-5


def test_mesh_spec_and_rest_axis():
    mesh = sharding.make_mesh("data=2,fsdp=-1,tensor=2")
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "expert": 1, "tensor": 2}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
    assert sharding.format_mesh_spec(mesh) == "data=2,fsdp=2,expert=1,tensor=2"


@pytest.mark.parametrize("spec, match", [
    ("data=3", "needs 3 devices but 8"),
    ("data=-1,fsdp=-1", "at most one axis"),
    ("pipeline=2", "unknown axis 'pipeline'"),
    ("data=2,data=4", "given twice"),
    ("data=two", "cannot read"),
    ("data=3,fsdp=-1", "does not divide the 8 devices"),
])
def test_bad_mesh_specs(spec, match):
    with pytest.raises(MeshError, match=match) as err:
        sharding.make_mesh(spec)
    assert str(err.value).startswith(f"mesh '{spec}'")  # names the Python argument, not a command-line flag


def test_rules_map_logical_names():
    mesh = sharding.make_mesh("data=1,fsdp=2,expert=2,tensor=2")
    assert sharding.logical_to_spec(("layers", "experts", "embed", "mlp"), mesh) == P(None, "expert", "fsdp", "tensor")
    assert sharding.logical_to_spec(("batch", "length", None), mesh) == P(("fsdp", "expert"), None, None)
    assert sharding.logical_to_spec(("vocab", "embed"), mesh) == P("tensor", "fsdp")
    # kv heads fewer than tensor shards: replicated (tensor is a multiple of kv_heads)
    mesh4 = sharding.make_mesh("data=2,tensor=4")
    assert sharding.logical_to_spec(("embed", "kv_heads", "head_dim"), mesh4, (48, 2, 16)) == P(None, None, None)
    assert sharding.logical_to_spec(("embed", "kv_heads", "head_dim"), mesh4, (48, 8, 16)) == P(None, "tensor", None)


def test_mesh_that_does_not_divide_the_model(golden_dir):
    cfg = m1_jax.M1Config.from_json(golden_dir / "config.json")  # 4 heads, 2 kv heads, 4 experts
    with pytest.raises(MeshError, match=r"tensor=8 does not divide num_attention_heads=4"):
        sharding.check_mesh(cfg, sharding.make_mesh("tensor=8"))
    with pytest.raises(MeshError, match=r"expert=8 does not divide num_local_experts=4"):
        sharding.check_mesh(cfg, sharding.make_mesh("expert=8"))
    with pytest.raises(MeshError, match=r"tensor=4 neither divides num_key_value_heads=3"):
        sharding.check_mesh(cfg.replace(num_attention_heads=12, num_key_value_heads=3),
                            sharding.make_mesh("data=2,tensor=4"))
    with pytest.raises(MeshError, match=r"expert=8 does not divide num_local_experts=4"):
        m1_jax.from_pretrained(golden_dir, mesh="expert=8")
    model = m1_jax.from_pretrained(golden_dir, mesh="data=2,expert=2,tensor=2")
    with pytest.raises(MeshError, match=r"batch=2 is not divisible by data\*fsdp\*expert=4"):
        model(jnp.zeros((2, 5), jnp.int32))


@pytest.fixture(scope="module")
def inputs(golden_dir):
    ids = np.load(golden_dir / "inputs.npz")["input_ids"]  # (2, 37)
    return jnp.asarray(np.concatenate([ids, ids[::-1]] * 2))  # batch 8: divisible by every mesh below


def _loss_fn(graphdef):
    def loss(state, ids):
        out = nnx.merge(graphdef, state).forward(ids[:, :-1])
        ce = optax.softmax_cross_entropy_with_integer_labels(out.logits, ids[:, 1:]).mean()
        return ce + 0.01 * out.aux_loss, (out.logits, out.aux_loss)
    return jax.jit(jax.value_and_grad(loss, has_aux=True))


@pytest.fixture(scope="module")
def single_results(golden_dir, inputs):
    graphdef, state = nnx.split(m1_jax.from_pretrained(golden_dir))
    return _loss_fn(graphdef)(state, inputs)


@pytest.mark.parametrize("spec", ["data=2,expert=2,tensor=2", "fsdp=4,expert=2"])
def test_sharded_golden_logits_and_grads(golden_dir, inputs, single_results, spec):
    model = m1_jax.from_pretrained(golden_dir, mesh=spec)
    w1 = model.periods.layers[0].block_sparse_moe.w1[...]
    mesh = model.mesh
    assert w1.sharding.spec == sharding.logical_to_spec(("layers", "experts", "embed", "mlp"), mesh, w1.shape)
    # each device holds only its shard of the expert weights
    assert w1.addressable_shards[0].data.shape[1] == w1.shape[1] // mesh.shape["expert"]

    graphdef, state = nnx.split(model)
    (loss, (logits, aux)), grads = _loss_fn(graphdef)(state, inputs)
    (ref_loss, (ref_logits, ref_aux)), ref_grads = single_results
    assert logits.sharding.spec[0] is not None  # the batch stays split
    np.testing.assert_allclose(np.asarray(logits), np.asarray(ref_logits), rtol=0, atol=TOL)
    golden = np.load(golden_dir / "outputs.npz")["logits"][:, :-1]  # causal: the prefix's logits
    np.testing.assert_allclose(np.asarray(logits[:2]), golden, rtol=0, atol=1e-4)
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=TOL)
    np.testing.assert_allclose(float(aux), float(ref_aux), rtol=TOL)
    flat, ref_flat = nnx.to_flat_state(grads), dict(nnx.to_flat_state(ref_grads))
    for path, g in flat:
        np.testing.assert_allclose(np.asarray(g.get_value()), np.asarray(ref_flat[path].get_value()),
                                   rtol=TOL, atol=TOL, err_msg=".".join(map(str, path)))


@pytest.mark.parametrize("tensor", [4])
def test_lightning_output_norm_spans_heads_across_tensor_shards(golden_dir, tensor):
    """The lightning output RMSNorm normalises all heads jointly; with heads split over `tensor` the
    statistic must still cover every head (XLA inserts the cross-shard reduction)."""
    from m1_jax.layers.lightning import LightningAttention
    from m1_jax.layers.norms import rms_normalize

    cfg = m1_jax.M1Config.from_json(golden_dir / "config.json")
    layer = LightningAttention(cfg, rngs=nnx.Rngs(3), impl="xla")
    h = jax.random.normal(jax.random.key(4), (8 // tensor, 19, cfg.hidden_size))
    slopes = jnp.asarray(m1_jax.model.period_slopes(cfg)[0, 0])
    ref, ref_state = layer(h, slopes)
    mesh = sharding.make_mesh(f"data=-1,tensor={tensor}")
    graphdef, state = nnx.split(layer)
    state = jax.tree.map(sharding.put_array, state, sharding.state_shardings(state, mesh))
    assert nnx.state(nnx.merge(graphdef, state))["norm"]["weight"].get_value().sharding.spec[0] == "tensor"

    @jax.jit
    def run(state, h):
        with sharding.activate(mesh):
            return nnx.merge(graphdef, state)(h, slopes)

    out, final = run(state, h)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=TOL, atol=TOL)
    np.testing.assert_allclose(np.asarray(final), np.asarray(ref_state), rtol=TOL, atol=TOL)
    # a per-shard norm (statistic over the local heads only) would differ visibly
    o_heads = jax.random.normal(jax.random.key(5), (2, 3, cfg.num_attention_heads, cfg.head_dim))
    full = layer.norm(o_heads)
    local = jnp.concatenate([rms_normalize(o, cfg.lightning_norm_eps, (-2, -1))
                             for o in jnp.split(o_heads, tensor, axis=2)], axis=2)
    assert float(jnp.abs(full - local).max()) > 1e-3
