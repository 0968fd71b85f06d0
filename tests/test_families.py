"""Every feature on the newer families, loaded from tiny transformers checkpoints: a capacity policy with a
huge factor equals dropless, expert parallelism on the 8 CPU devices equals one device, buffered generation
equals moejax.generate; and their bad input."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import moejax
from moejax import buffering, parallel
from tests import hf_models

VOCAB = 96
TOKENS = jnp.asarray(np.random.RandomState(0).randint(0, VOCAB, size=(2, 9)))
PROMPTS = [[5, 17, 3], [9, 41, 2, 77, 60, 11, 8]]
# one variant per family, each with 8 experts (one per CPU device)
FAMILIES = ["qwen3_moe-e8k2-head_dim", "deepseek_v3-e8k2-groups-dense-first",
            "glm4_moe-e8k2-groups-partial-qknorm-bias-dense-first", "granitemoeshared-e8k3-shared-bias",
            "ernie4_5_moe-e8k2-shared-start1", "dots1-e8k2-groups-norm-dense-first-head_dim",
            "minimax_m2-e8k2-partial-head_dim"]

forward = nnx.jit(lambda m, t: m.forward(t))


@pytest.fixture(scope="module", params=FAMILIES)
def checkpoint(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    hf_models.save(request.param, path)
    return path


@pytest.fixture(scope="module")
def model(checkpoint):
    return moejax.load_pretrained(checkpoint)


def test_huge_capacity_factor_equals_dropless(model):
    ref = forward(model, TOKENS)
    for drop in ("score", "first"):
        out = forward(moejax.with_policy(model, moejax.MoEPolicy(capacity_factor=1000.0, drop=drop)), TOKENS)
        np.testing.assert_allclose(np.asarray(out.logits), np.asarray(ref.logits), atol=1e-5, rtol=0)
        assert all(bool(r.keep.all()) for r in out.routings if r is not None)


def test_expert_parallel_equals_one_device(model):
    ref = forward(model, TOKENS)
    out = forward(parallel.expert_parallel(model, parallel.make_mesh()), TOKENS)
    np.testing.assert_allclose(np.asarray(out.logits), np.asarray(ref.logits), atol=1e-5, rtol=0)


def test_buffered_generation_equals_generate(model):
    resident = np.asarray(moejax.generate(model, PROMPTS, max_new_tokens=6))
    run = buffering.generate(model, PROMPTS, 6, cache_size=3, policy="lifo")
    np.testing.assert_array_equal(run.tokens, resident)


def test_a_correction_bias_of_the_wrong_shape_is_named(tmp_path):
    from safetensors.numpy import load_file, save_file

    hf_models.save("deepseek_v3-e8k2-groups-dense-first", tmp_path)
    file = os.path.join(tmp_path, "model.safetensors")
    tensors = load_file(file)
    name = "model.layers.1.mlp.gate.e_score_correction_bias"
    tensors[name] = np.zeros(7, np.float32)
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"tensor 'model\.layers\.1\.mlp\.gate\.e_score_correction_bias' has "
                                         r"shape \(7,\), expected \(8,\)"):
        moejax.load_pretrained(tmp_path)


@pytest.mark.parametrize("key, value", [("topk_method", "greedy"), ("scoring_func", "softmax"), ("moe_layer_freq", 2)])
def test_a_router_transformers_would_not_compute_is_refused_by_name(tmp_path, key, value):
    hf_models.save("deepseek_v3-e8k2-groups-dense-first", tmp_path)
    config_file = os.path.join(tmp_path, "config.json")
    with open(config_file) as f:
        config = json.load(f)
    with open(config_file, "w") as f:
        json.dump({**config, key: value}, f)
    with pytest.raises(ValueError, match=f"{key}={value!r}"):
        moejax.load_pretrained(tmp_path)


def test_multi_token_prediction_layers_are_skipped_and_nothing_else(tmp_path):
    from safetensors.numpy import load_file, save_file

    hf_models.save("glm4_moe-e8k2-groups-partial-qknorm-bias-dense-first", tmp_path)  # 3 layers, 1 MTP layer
    file = os.path.join(tmp_path, "model.safetensors")
    tensors = load_file(file)
    ref = np.asarray(moejax.load_pretrained(tmp_path)(TOKENS))
    save_file({**tensors, "model.layers.3.eh_proj.weight": np.ones((4, 4), np.float32)}, file)
    np.testing.assert_array_equal(np.asarray(moejax.load_pretrained(tmp_path)(TOKENS)), ref)
    save_file({**tensors, "model.layers.4.eh_proj.weight": np.ones((4, 4), np.float32)}, file)
    with pytest.raises(ValueError, match=r"unexpected tensor 'model\.layers\.4\.eh_proj\.weight'"):
        moejax.load_pretrained(tmp_path)
