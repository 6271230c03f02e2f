"""Fixtures of the serving tests: a tiny model that has learnt one reply with reasoning and a tool call."""

import fcntl
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from tiny_models import tiny_config

from m1_jax import chat
from m1_jax.config import FULL, LINEAR
from m1_jax.model import M1Model
from m1_jax.tokenizer import EOS_TOKEN, ByteTokenizer
from m1_jax.train import loss_sums

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "weather of a city",
                                           "parameters": {"type": "object",
                                                          "properties": {"city": {"type": "string"}}}}}]
MESSAGES = [{"role": "user", "content": "Weather in Paris?"}]
REPLY = ('<think>\nThe user wants the weather.\n</think>\nChecking.\n<tool_calls>\n'
         '{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_calls>')


def _train(model, prompt: list[int], reply: list[int]) -> None:
    ids = np.array(prompt + reply, np.int32)
    mask = np.zeros(len(ids) - 1, np.float32)
    mask[len(prompt) - 1:] = 1.0
    batch = {"inputs": jnp.asarray(ids[None, :-1]), "targets": jnp.asarray(ids[None, 1:]),
             "loss_mask": jnp.asarray(mask[None])}
    opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt, batch):
        def loss(model):
            s = loss_sums(model, batch)
            return s["ce"] / s["tokens"]
        value, grads = nnx.value_and_grad(loss)(model)
        opt.update(model, grads)
        return value

    for _ in range(300):
        if float(step(model, opt, batch)) < 0.01:
            break


@pytest.fixture(scope="session")
def tool_model(tmp_path_factory):
    """(model, tokenizer): the tiny model with one layer of each kind, trained until its greedy reply to
    :data:`MESSAGES` with :data:`TOOLS` is :data:`REPLY` followed by the end-of-turn token. Trained once
    per session (pytest-xdist workers share the saved weights)."""
    tok = ByteTokenizer(512)
    prompt = tok.encode(chat.render(MESSAGES, TOOLS))
    reply = tok.encode(REPLY + EOS_TOKEN)
    model = M1Model(tiny_config(layer_types=[LINEAR, FULL]), rngs=nnx.Rngs(0))
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    saved = root / "tool-model.npz"
    with open(root / "tool-model.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        graphdef, state = nnx.split(model)
        leaves, treedef = jax.tree.flatten(state)
        if saved.exists():
            with np.load(saved) as f:
                model = nnx.merge(graphdef, jax.tree.unflatten(treedef, [jnp.asarray(f[str(i)]) for i in range(len(leaves))]))
        else:
            _train(model, prompt, reply)
            np.savez(saved, **{str(i): np.asarray(x) for i, x in enumerate(jax.tree.leaves(nnx.state(model)))})
    logits = model(jnp.asarray([prompt + reply[:-1]]))
    greedy = np.asarray(jnp.argmax(logits[0, len(prompt) - 1:], axis=-1))
    assert greedy.tolist() == reply, "the tiny model did not learn the reply"
    return model, tok
