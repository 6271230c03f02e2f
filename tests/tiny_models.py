"""Tiny models for the tests, each built in one place: our config (:func:`tiny_config`) and transformers'
native MiniMax model with its saved checkpoint and logits (:func:`native_checkpoint`).

Test modules import it by name (``from tiny_models import tiny_config``): pytest puts this directory on
``sys.path`` for the ``conftest.py`` beside it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from m1_jax.config import FULL, LINEAR, M1_DEEPNORM_ALPHA, M1Config
from m1_jax.presets import resolve_config


def tiny_config(**overrides) -> M1Config:
    """The ``tiny`` preset (vocabulary 512, 4 layers of hidden size 64, 4 heads of 16, 4 experts) with
    ``overrides``; ``num_hidden_layers`` follows ``layer_types`` unless given."""
    if "layer_types" in overrides:
        overrides.setdefault("num_hidden_layers", len(overrides["layer_types"]))
    return resolve_config("tiny").replace(**overrides)


# transformers' MiniMaxConfig of the native-model tests: heads * head_dim != hidden_size, M1's DeepNorm alphas.
NATIVE_CONFIG = dict(
    vocab_size=97, hidden_size=40, intermediate_size=24, num_attention_heads=4, num_key_value_heads=2,
    head_dim=12, num_local_experts=4, num_experts_per_tok=2, layer_types=[LINEAR, FULL] * 2, block_size=5,
    full_attn_alpha_factor=M1_DEEPNORM_ALPHA, full_attn_beta_factor=1.0, linear_attn_alpha_factor=M1_DEEPNORM_ALPHA,
    linear_attn_beta_factor=1.0, mlp_alpha_factor=M1_DEEPNORM_ALPHA, mlp_beta_factor=1.0,
    rope_parameters={"rope_type": "default", "rope_theta": 1e7}, rms_norm_eps=1e-5, tie_word_embeddings=False,
    initializer_range=0.2, max_position_embeddings=256, attn_implementation="eager",
)


def native_model(**overrides):
    """transformers' ``MiniMaxForCausalLM`` (float32, eval mode) of :data:`NATIVE_CONFIG` with ``overrides``
    (``num_hidden_layers`` follows ``layer_types``): seeded, norm weights drawn from U(0.5, 1.5) so that a
    norm applied wrongly shows in the logits."""
    # torch and transformers are optional test dependencies: only the tests that use them import them.
    import torch
    import transformers

    if not hasattr(transformers, "MiniMaxForCausalLM"):
        pytest.skip(f"transformers {transformers.__version__} has no MiniMaxForCausalLM")
    kw = {**NATIVE_CONFIG, **overrides}
    kw["num_hidden_layers"] = len(kw["layer_types"])
    torch.manual_seed(0)
    model = transformers.MiniMaxForCausalLM(transformers.MiniMaxConfig(**kw)).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def native_checkpoint(out: Path, seq_len: int, **overrides) -> dict:
    """:func:`native_model` written to ``out`` by ``save_pretrained`` (original per-expert names) and its
    float32 logits on random ids [2, seq_len]: ``{"model", "dir", "ids", "logits"}``."""
    import torch

    model = native_model(**overrides)
    model.save_pretrained(out)
    ids = torch.randint(0, model.config.vocab_size, (2, seq_len), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits.float().numpy()
    return {"model": model, "dir": Path(out), "ids": ids.numpy(), "logits": logits}


def fused_checkpoint(native: dict, out: Path) -> Path:
    """The weights of ``native`` (:func:`native_checkpoint`) under transformers-5's in-memory names
    (``.mlp.``, experts fused and stacked: ``gate_up_proj`` / ``down_proj``), written to ``out``."""
    from safetensors.torch import save_file

    sd = {k: v.detach().clone().contiguous() for k, v in native["model"].state_dict().items()}
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in sd)
    out.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text((native["dir"] / "config.json").read_text())
    return out
