"""export_pretrained: moejax models written as Hugging Face checkpoints that transformers and moejax load alike."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import moejax
from tests.tiny import tiny_config

CONFIGS = {
    # intermediate_size: these families have one FFN size, the experts'
    "mixtral": dict(architecture="mixtral", tie_word_embeddings=True, sliding_window=8, intermediate_size=24),
    "olmoe": dict(architecture="olmoe", qk_norm=True, norm_topk_prob=False, num_experts=8, num_experts_per_tok=3,
                  intermediate_size=24),
    "qwen2_moe": dict(architecture="qwen2_moe", qkv_bias=True, norm_topk_prob=False, shared_expert_intermediate_size=40,
                      shared_expert_gate=True, moe_layers=(True, False), intermediate_size=56),
}


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_exported_checkpoint_loads_in_transformers_and_moejax(family, tmp_path):
    model = moejax.random_model(tiny_config(**CONFIGS[family]), seed=5)
    for block in model.moe_blocks():
        block.router[...] = block.router[...] * 10  # decisive routing, as a trained model has
    moejax.export_pretrained(model, tmp_path)
    tokens = np.random.RandomState(0).randint(0, 64, size=(2, 12))
    ours = np.asarray(model(jnp.asarray(tokens)))
    reloaded = moejax.load_pretrained(tmp_path)
    assert reloaded.config == model.config
    np.testing.assert_array_equal(np.asarray(reloaded(jnp.asarray(tokens))), ours)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(hf).__name__ == moejax.config.to_hf_config(model.config)["architectures"][0]
    with torch.no_grad():
        theirs = hf(torch.tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)


def test_unexpressible_configs_are_refused(tmp_path):
    with pytest.raises(ValueError, match="cannot export as mixtral: norm_topk_prob=False"):
        moejax.export_pretrained(moejax.random_model(tiny_config(norm_topk_prob=False)), tmp_path)
