"""Every feature on the newer families, loaded from tiny transformers checkpoints: a capacity policy with a
huge factor equals dropless, expert parallelism on the 8 CPU devices equals one device, buffered generation
equals moejax.generate; and their bad input."""

import json
import os
import re

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
            "minimax_m2-e8k2-partial-head_dim", "gpt_oss-e8k3-full-first-default-rope-mqa-nobias",
            "llama4_text-e8-every-layer-llama3-rope-tied-mqa", "phimoe-e8k2-wide-band-window-tied-mqa",
            "exaone_moe-e8k2-groups-sliding-nope-dense-first", "solar_open-e8k2-groups-qkv-bias",
            "glm4_moe_lite-e8k2-groups-dense-first-qlora", "sarvam_moe-e8k2-groups-qknorm-qkv-bias-dense-first",
            "dbrx-e8k3-unnormalised-gelu-mqa", "granitemoe_swa-e8k3-noshared-rope-theta-tied-mqa",
            "hy_v3-e8k2-dense-first-qkv-bias", "flint-e8k2-sinks-window-nope-shared",
            "aria_text-e8k3-shared2-llama3-rope-tied-mqa"]

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


@pytest.mark.parametrize("name, mtp_tensor, other_tensor", [
    ("glm4_moe-e8k2-groups-partial-qknorm-bias-dense-first", "model.layers.3.eh_proj.weight",  # 3 layers, 1 MTP
     "model.layers.4.eh_proj.weight"),
    ("exaone_moe-e8k2-groups-sliding-nope-dense-first", "mtp.eh_proj.weight", "model.layers.3.eh_proj.weight")])
def test_multi_token_prediction_layers_are_skipped_and_nothing_else(tmp_path, name, mtp_tensor, other_tensor):
    from safetensors.numpy import load_file, save_file

    hf_models.save(name, tmp_path)
    file = os.path.join(tmp_path, "model.safetensors")
    tensors = load_file(file)
    ref = np.asarray(moejax.load_pretrained(tmp_path)(TOKENS))
    save_file({**tensors, mtp_tensor: np.ones((4, 4), np.float32)}, file)
    np.testing.assert_array_equal(np.asarray(moejax.load_pretrained(tmp_path)(TOKENS)), ref)
    save_file({**tensors, other_tensor: np.ones((4, 4), np.float32)}, file)
    with pytest.raises(ValueError, match=f"unexpected tensor '{re.escape(other_tensor)}'"):
        moejax.load_pretrained(tmp_path)


def test_export_writes_a_checkpoint_transformers_and_moejax_load_alike(checkpoint, model, tmp_path):
    """to_hf_config's config.json and the load plan's tensors, read back by transformers (the logits of the
    exported checkpoint are moejax's) and by moejax (the same config)."""
    import torch
    import transformers

    moejax.export_pretrained(model, tmp_path)
    assert moejax.load_pretrained(tmp_path).config == model.config
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        theirs = hf(torch.tensor(np.asarray(TOKENS))).logits.numpy()
    np.testing.assert_allclose(theirs, np.asarray(model(TOKENS)), atol=1e-4, rtol=0)


@pytest.mark.parametrize("field, value", [("attention_sinks", False), ("router_bias", False), ("moe_bias", False)])
def test_a_config_its_family_cannot_express_is_refused_by_name(field, value):
    import dataclasses

    from moejax.config import from_hf_config, to_hf_config

    config = from_hf_config(hf_models.build("gpt_oss-e4k2-window-yarn-clamped").config.to_dict())
    with pytest.raises(ValueError, match=f"cannot export as gpt_oss: {field}={value!r} is not expressible there"):
        to_hf_config(dataclasses.replace(config, **{field: value}))


def _config_json(name, **changes):
    hf = hf_models.build(name).config.to_dict()
    return {**hf, **changes}


@pytest.mark.parametrize("name, changes, message", [
    ("llama4_text-e4-interleaved-chunked-nope-qknorm", dict(num_experts_per_tok=2),
     "num_experts_per_tok=2 is invalid: a router that scales the expert's input"),
    ("llama4_text-e4-interleaved-chunked-nope-qknorm", dict(no_rope_layers=[1, 0]),
     r"no_rope_layers=\[1, 0\] needs one flag per layer \(4\)"),
    ("llama4_text-e4-interleaved-chunked-nope-qknorm", dict(layer_types=["chunked_attention"] * 3 + ["local"]),
     "layer_types=.* supported kinds"),
    ("llama4_text-e4-interleaved-chunked-nope-qknorm", dict(no_rope_layers=["yes"] * 4), "no_rope_layers=.* 0 / 1 flags"),
    ("phimoe-e4k2-biases-lm-head-bias-longrope", dict(num_experts_per_tok=3), "sparsemixer routes every token to exactly 2"),
    ("phimoe-e4k2-biases-lm-head-bias-longrope", dict(rope_parameters=dict(rope_type="dynamic", rope_theta=1e4,
                                                                            factor=2.0)), "rope_type='dynamic' is invalid"),
    ("phimoe-e4k2-biases-lm-head-bias-longrope", dict(rope_parameters=dict(
        rope_type="longrope", rope_theta=1e4, short_factor=[1.0] * 3, long_factor=[1.0] * 3, short_mscale=1.0,
        long_mscale=1.0, original_max_position_embeddings=64)), r"short_factor=\(1.0, 1.0, 1.0\) is invalid"),
    ("gpt_oss-e4k2-window-yarn-clamped", dict(swiglu_limit="7"), "swiglu_limit='7' is invalid: must be a number"),
    ("gpt_oss-e4k2-window-yarn-clamped", dict(sliding_window=None), "sliding_window=None is invalid: sliding_attention"),
    ("solar_open-e8k2-groups-qkv-bias", dict(rope_parameters=dict(rope_type="default", rope_theta=1e6,
                                                                   partial_rotary_factor=0.5)),
     "partial_rotary_factor=0.5 is not supported for solar_open"),
    ("dbrx-e4k2-clip", dict(ffn_config=dict(moe_normalize_expert_weights=2.0)),
     "ffn_config.moe_normalize_expert_weights=2.0 is not supported for dbrx"),
    ("dbrx-e4k2-clip", dict(rope_parameters=None, attn_config=dict(kv_n_heads=2, clip_qkv=8, rope_theta=500000)),
     "attn_config.rope_theta=500000 without rope_parameters: transformers 5 ignores it"),
    ("dbrx-e4k2-clip", dict(attn_config=dict(kv_n_heads="2")),
     "attn_config.kv_n_heads='2' is invalid: must be an integer"),
    ("dbrx-e4k2-clip", dict(ffn_config=[16]), r"ffn_config=\[16\] is invalid: must be an object"),
    ("granitemoe_swa-e4k2-window-nope-shared", dict(layer_rope_theta=[0, 1e4, 5e4]),
     r"layer_rope_theta=\[0, 10000.0, 50000.0\] is not supported: moejax rotates every rope layer with one theta"),
    ("aria_text-e4k2-shared-bias", dict(hidden_act="gelu"), "hidden_act='gelu' is not supported for aria_text"),
    ("exaone_moe-e8k2-groups-sliding-nope-dense-first", dict(layer_types=None, sliding_window_pattern="LLLG"),
     "sliding_window_pattern='LLLG' is not supported for exaone_moe"),
    ("exaone_moe-e8k2-groups-sliding-nope-dense-first", dict(mlp_layer_types=["dense", "moe", "sparse"]),
     r"mlp_layer_types=\['dense', 'moe', 'sparse'\] needs one 'dense' or 'sparse' per layer \(3\)"),
])
def test_bad_config_json_of_the_new_families_is_named(name, changes, message):
    from moejax.config import from_hf_config

    with pytest.raises(ValueError, match=message):
        from_hf_config(_config_json(name, **changes))


def test_every_refused_model_type_is_refused_by_name_with_its_reason_and_the_supported_list():
    """moejax.families.REFUSED: transformers' other MoE model types, each a model type transformers has, refused
    naming what it needs; an unknown type lists the supported ones too."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    from moejax.config import SUPPORTED_MODEL_TYPES, from_hf_config
    from moejax.families import REFUSED

    assert not set(REFUSED) & SUPPORTED_MODEL_TYPES and set(REFUSED) <= set(CONFIG_MAPPING_NAMES)
    supported = re.escape(str(sorted(SUPPORTED_MODEL_TYPES)))
    for model_type, why in REFUSED.items():
        with pytest.raises(ValueError, match=f"model_type '{model_type}' is not supported: {re.escape(why)}; "
                                             f"supported model types: {supported}"):
            from_hf_config({"model_type": model_type})
    with pytest.raises(ValueError, match=f"unknown model_type 'llama'; supported model types: {supported}"):
        from_hf_config({"model_type": "llama"})


def test_kimi_k2_config_json_loads_as_deepseek_v3():
    """Kimi-K2's config.json says model_type kimi_k2 (architectures DeepseekV3ForCausalLM, rope_scaling with
    "type"): the model is DeepSeek-V3's, its fields read from the same keys."""
    from moejax.config import from_hf_config

    hf = _config_json("deepseek_v3-e8k2-groups-dense-first")
    kimi = {**{k: v for k, v in hf.items() if k not in ("rope_parameters", "transformers_version")},
            "model_type": "kimi_k2", "architectures": ["DeepseekV3ForCausalLM"], "rope_theta": 50000.0,
            "rope_scaling": {"type": "yarn", "factor": 32.0, "beta_fast": 1.0, "beta_slow": 1.0, "mscale": 1.0,
                             "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096}}
    config = from_hf_config(kimi)
    assert config.architecture == "deepseek_v3" and config.rope.kind == "yarn" and config.rope.theta == 50000.0
    assert config == from_hf_config({**kimi, "model_type": "deepseek_v3"})


def test_sarvam_config_json_as_the_hub_writes_it_reads_as_transformers_maps_it():
    """Sarvam-30B's config.json names keys by SarvamMoEConfig's attribute_map aliases; Sarvam-105B's older one
    says rope type deepseek_yarn and a head_dim that is not qk_rope_head_dim."""
    from moejax.config import from_hf_config

    moe = _config_json("sarvam_moe-e8k2-groups-qknorm-qkv-bias-dense-first")
    alias = {"n_routed_experts": "num_experts", "n_shared_experts": "num_shared_experts",
             "attention_bias": "use_qkv_bias", "num_nextn_predict_layers": "num_mtp_layers"}
    hub = {alias.get(k, k): v for k, v in moe.items()}
    assert "n_routed_experts" not in hub and from_hf_config(hub) == from_hf_config(moe)
    mla = _config_json("sarvam_mla-e6k3-dense-first")
    yarn = dict(factor=4.0, original_max_position_embeddings=64, beta_fast=32.0, beta_slow=1.0, mscale=1.0,
                mscale_all_dim=1.0, rope_theta=10000.0)
    legacy = {**{k: v for k, v in mla.items() if k != "rope_parameters"}, "head_dim": 128, "q_head_dim": 12,
              "rope_scaling": {"type": "deepseek_yarn", **yarn}}
    config = from_hf_config(legacy)
    assert config.architecture == "deepseek_v3" and config.rope.kind == "yarn"
    assert config == from_hf_config({**mla, "rope_parameters": {"rope_type": "yarn", **yarn}})


def test_the_parameters_of_the_new_families_are_each_read_from_the_checkpoint(tmp_path):
    """A missing GPT-OSS sink or expert bias, a Llama 4 router, a Phi-3.5-MoE LM-head bias: named."""
    from safetensors.numpy import load_file, save_file

    for name, missing in [("gpt_oss-e4k2-window-yarn-clamped", "model.layers.0.self_attn.sinks"),
                          ("gpt_oss-e4k2-window-yarn-clamped", "model.layers.1.mlp.experts.gate_up_proj_bias"),
                          ("llama4_text-e4-interleaved-chunked-nope-qknorm", "model.layers.1.feed_forward.router.weight"),
                          ("phimoe-e4k2-biases-lm-head-bias-longrope", "lm_head.bias")]:
        path = tmp_path / name
        hf_models.save(name, path)
        tensors = load_file(path / "model.safetensors")
        del tensors[missing]
        save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
        with pytest.raises(ValueError, match=f"missing tensor '{missing}'"):
            moejax.load_pretrained(path)


def test_longrope_past_its_original_context_is_refused(tmp_path):
    """transformers switches a longer sequence to long_factor / long_mscale; moejax computes the short regime
    only, and says so rather than compute something else."""
    hf_models.save("phimoe-e4k2-biases-lm-head-bias-longrope", tmp_path)  # original_max_position_embeddings 64
    model = moejax.load_pretrained(tmp_path)
    with pytest.raises(ValueError, match="a sequence of 70 positions runs past original_max_position_embeddings=64"):
        moejax.generate(model, [[1] * 60], max_new_tokens=11)
    with pytest.raises(ValueError, match="a sequence of 65 positions runs past original_max_position_embeddings=64"):
        model(jnp.ones((1, 65), jnp.int32))
