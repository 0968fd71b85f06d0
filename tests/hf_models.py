"""Tiny random Hugging Face MoE checkpoints, built from a config with no download (parity references)."""

from __future__ import annotations

import torch
import transformers

# name -> (config class, model class, config kwargs). Several variants per family: k, number of experts,
# norm_topk_prob both ways, shared experts, GQA ratios, tied embeddings, dense layers, latent attention.
_BASE = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.1)

VARIANTS = {
    "mixtral-e4k2": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=4, num_experts_per_tok=2)),
    "mixtral-e8k3-mqa-tied-window": ("MixtralConfig", "MixtralForCausalLM", dict(
        num_local_experts=8, num_experts_per_tok=3, num_key_value_heads=1, tie_word_embeddings=True,
        sliding_window=6, num_hidden_layers=3)),
    "olmoe-e8k2": ("OlmoeConfig", "OlmoeForCausalLM", dict(num_experts=8, num_experts_per_tok=2)),
    "olmoe-e6k3-norm-clip": ("OlmoeConfig", "OlmoeForCausalLM", dict(
        num_experts=6, num_experts_per_tok=3, norm_topk_prob=True, clip_qkv=0.5, num_key_value_heads=4)),
    "qwen2_moe-e4k2": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=24)),
    "qwen2_moe-e8k4-norm-sparse-step": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(
        num_experts=8, num_experts_per_tok=4, moe_intermediate_size=16, shared_expert_intermediate_size=40,
        norm_topk_prob=True, decoder_sparse_step=2, mlp_only_layers=[3], num_hidden_layers=4)),
    "deepseek_v2-lite": ("DeepseekV2Config", "DeepseekV2ForCausalLM", dict(
        n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, n_shared_experts=1,
        first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=None, qk_nope_head_dim=8, qk_rope_head_dim=4,
        v_head_dim=6, num_key_value_heads=4)),
    "deepseek_v2-group-limited-qlora-yarn": ("DeepseekV2Config", "DeepseekV2ForCausalLM", dict(
        n_routed_experts=8, num_experts_per_tok=3, moe_intermediate_size=16, n_shared_experts=2,
        first_k_dense_replace=0, kv_lora_rank=12, q_lora_rank=20, qk_nope_head_dim=8, qk_rope_head_dim=8,
        v_head_dim=8, num_key_value_heads=4, topk_method="group_limited_greedy", n_group=4, topk_group=2,
        routed_scaling_factor=2.5, rope_parameters=dict(
            rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=64, mscale=0.707,
            mscale_all_dim=0.707, beta_fast=32, beta_slow=1))),
    "qwen3_moe-e8k2-head_dim": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
        num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, head_dim=12)),
    "qwen3_moe-e6k3-norm-sparse-bias-window": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
        num_experts=6, num_experts_per_tok=3, moe_intermediate_size=16, norm_topk_prob=True, decoder_sparse_step=2,
        mlp_only_layers=[3], num_hidden_layers=4, attention_bias=True, use_sliding_window=True, sliding_window=6,
        num_key_value_heads=1, tie_word_embeddings=True)),
    "deepseek_v3-e8k2-groups-dense-first": ("DeepseekV3Config", "DeepseekV3ForCausalLM", dict(
        n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2, moe_intermediate_size=16,
        n_shared_experts=1, first_k_dense_replace=1, num_hidden_layers=3, kv_lora_rank=16, q_lora_rank=None,
        qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6, num_key_value_heads=4, norm_topk_prob=True,
        routed_scaling_factor=2.5)),
    "deepseek_v3-e6k3-one-group-nonorm-qlora-yarn-halfsplit": ("DeepseekV3Config", "DeepseekV3ForCausalLM", dict(
        n_routed_experts=6, num_experts_per_tok=3, n_group=1, topk_group=1, moe_intermediate_size=16,
        n_shared_experts=2, first_k_dense_replace=0, kv_lora_rank=12, q_lora_rank=20, qk_nope_head_dim=8,
        qk_rope_head_dim=8, v_head_dim=8, num_key_value_heads=4, norm_topk_prob=False, routed_scaling_factor=1.5,
        rope_interleave=False, rope_parameters=dict(
            rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=64, mscale=1.0,
            mscale_all_dim=1.0, beta_fast=32, beta_slow=1))),
    "glm4_moe-e8k2-groups-partial-qknorm-bias-dense-first": ("Glm4MoeConfig", "Glm4MoeForCausalLM", dict(
        n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1, moe_intermediate_size=16,
        n_shared_experts=1, first_k_dense_replace=1, num_hidden_layers=3, use_qk_norm=True, attention_bias=True,
        head_dim=16, partial_rotary_factor=0.5, routed_scaling_factor=2.5)),
    "glm4_moe-e6k3-nonorm-quarter-rotary": ("Glm4MoeConfig", "Glm4MoeForCausalLM", dict(
        n_routed_experts=6, num_experts_per_tok=3, moe_intermediate_size=16, n_shared_experts=2,
        first_k_dense_replace=0, norm_topk_prob=False, routed_scaling_factor=1.8, num_key_value_heads=1,
        rope_parameters=dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.25))),
    "granitemoe-e4k2-multipliers-tied": ("GraniteMoeConfig", "GraniteMoeForCausalLM", dict(
        num_local_experts=4, num_experts_per_tok=2, intermediate_size=16, embedding_multiplier=12.0,
        residual_multiplier=0.22, attention_multiplier=0.3, logits_scaling=6.0, tie_word_embeddings=True)),
    "granitemoeshared-e8k3-shared-bias": ("GraniteMoeSharedConfig", "GraniteMoeSharedForCausalLM", dict(
        num_local_experts=8, num_experts_per_tok=3, intermediate_size=16, shared_intermediate_size=24,
        attention_bias=True, embedding_multiplier=6.0, residual_multiplier=0.5, attention_multiplier=0.25,
        logits_scaling=4.0, num_hidden_layers=3)),
    "ernie4_5_moe-e8k2-shared-start1": ("Ernie4_5_MoeConfig", "Ernie4_5_MoeForCausalLM", dict(
        moe_num_experts=8, moe_k=2, moe_intermediate_size=16, moe_num_shared_experts=1, moe_layer_start_index=1,
        num_hidden_layers=3)),
    "ernie4_5_moe-e6k3-interval2-noshared-untied": ("Ernie4_5_MoeConfig", "Ernie4_5_MoeForCausalLM", dict(
        moe_num_experts=6, moe_k=3, moe_intermediate_size=16, moe_num_shared_experts=0, moe_layer_start_index=0,
        moe_layer_interval=2, moe_layer_end_index=2, num_hidden_layers=4, tie_word_embeddings=False)),
    "dots1-e8k2-groups-norm-dense-first-head_dim": ("Dots1Config", "Dots1ForCausalLM", dict(
        n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1, n_shared_experts=1, moe_intermediate_size=16,
        first_k_dense_replace=1, num_hidden_layers=3, norm_topk_prob=True, routed_scaling_factor=2.0, head_dim=12)),
    "dots1-e6k3-nonorm-window-bias": ("Dots1Config", "Dots1ForCausalLM", dict(
        n_routed_experts=6, num_experts_per_tok=3, n_shared_experts=2, moe_intermediate_size=16,
        first_k_dense_replace=0, sliding_window=6, max_window_layers=0, attention_bias=True)),
    "minimax_m2-e8k2-partial-head_dim": ("MiniMaxM2Config", "MiniMaxM2ForCausalLM", dict(
        num_local_experts=8, num_experts_per_tok=2, head_dim=16, rotary_dim=8)),
    "minimax_m2-e6k3-full-rotary-mqa-tied": ("MiniMaxM2Config", "MiniMaxM2ForCausalLM", dict(
        num_local_experts=6, num_experts_per_tok=3, head_dim=8, num_key_value_heads=1, tie_word_embeddings=True,
        num_hidden_layers=3)),
    # GPT-OSS: sliding (window 4) and full layers alternating, default YaRN, a clamp that the values reach
    "gpt_oss-e4k2-window-yarn-clamped": ("GptOssConfig", "GptOssForCausalLM", dict(
        num_local_experts=4, num_experts_per_tok=2, head_dim=8, intermediate_size=16, sliding_window=4,
        swiglu_limit=0.5)),
    "gpt_oss-e8k3-full-first-default-rope-mqa-nobias": ("GptOssConfig", "GptOssForCausalLM", dict(
        num_local_experts=8, num_experts_per_tok=3, head_dim=16, intermediate_size=24, num_key_value_heads=1,
        num_hidden_layers=3, sliding_window=6, attention_bias=False,
        layer_types=["full_attention", "sliding_attention", "full_attention"],
        rope_parameters=dict(rope_type="default", rope_theta=10000.0))),
    # Llama 4: MoE every second layer (dense ones of intermediate_size_mlp), rope-free every second layer with
    # temperature tuning (floor_scale 4: the scale moves within these short prompts), chunks of 4 on rope layers
    "llama4_text-e4-interleaved-chunked-nope-qknorm": ("Llama4TextConfig", "Llama4ForCausalLM", dict(
        num_local_experts=4, num_experts_per_tok=1, head_dim=8, intermediate_size=16, intermediate_size_mlp=24,
        interleave_moe_layer_step=2, no_rope_layer_interval=2, attention_chunk_size=4, floor_scale=4,
        attn_scale=0.5, num_hidden_layers=4)),
    "llama4_text-e8-every-layer-llama3-rope-tied-mqa": ("Llama4TextConfig", "Llama4ForCausalLM", dict(
        num_local_experts=8, num_experts_per_tok=1, head_dim=8, intermediate_size=16, intermediate_size_mlp=24,
        interleave_moe_layer_step=1, no_rope_layer_interval=3, attention_chunk_size=None, use_qk_norm=False,
        attn_temperature_tuning=False, tie_word_embeddings=True, num_key_value_heads=1, num_hidden_layers=3,
        rope_parameters=dict(rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0,
                             high_freq_factor=4.0, original_max_position_embeddings=16))),
    # Phi-3.5-MoE: sparsemixer's band 2 * 0.01 (a first choice alone, mostly) with longrope's short regime (the
    # prompts stay within original_max_position_embeddings), then a wide band (0.3: softmaxes over several experts)
    "phimoe-e4k2-biases-lm-head-bias-longrope": ("PhimoeConfig", "PhimoeForCausalLM", dict(
        num_local_experts=4, num_experts_per_tok=2, intermediate_size=16, attention_bias=True, lm_head_bias=True,
        rope_parameters=dict(rope_type="longrope", rope_theta=10000.0, short_factor=[1.0, 1.3, 2.1, 3.5],
                             long_factor=[2.0, 3.0, 4.0, 5.0], short_mscale=1.2, long_mscale=1.4,
                             original_max_position_embeddings=64))),
    "phimoe-e8k2-wide-band-window-tied-mqa": ("PhimoeConfig", "PhimoeForCausalLM", dict(
        num_local_experts=8, num_experts_per_tok=2, intermediate_size=16, router_jitter_noise=0.3, sliding_window=6,
        tie_word_embeddings=True, num_key_value_heads=1, num_hidden_layers=3)),
    # K-EXAONE: layers sliding, full (rope-free), sliding; then sliding (rope) layers only, all MoE
    "exaone_moe-e8k2-groups-sliding-nope-dense-first": ("ExaoneMoeConfig", "ExaoneMoeForCausalLM", dict(
        num_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1, moe_intermediate_size=16, num_shared_experts=1,
        first_k_dense_replace=1, num_hidden_layers=3, sliding_window=4, sliding_window_pattern=2)),
    "exaone_moe-e6k3-nonorm-sliding-mlp-types-tied-mqa": ("ExaoneMoeConfig", "ExaoneMoeForCausalLM", dict(
        num_experts=6, num_experts_per_tok=3, moe_intermediate_size=16, num_shared_experts=2, sliding_window=6,
        layer_types=["sliding_attention"] * 2, mlp_layer_types=["sparse", "sparse"], norm_topk_prob=False,
        routed_scaling_factor=1.5, num_key_value_heads=1, tie_word_embeddings=True)),
    "solar_open-e8k2-groups-qkv-bias": ("SolarOpenConfig", "SolarOpenForCausalLM", dict(
        n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1, moe_intermediate_size=16, n_shared_experts=1,
        attention_bias=True, head_dim=8, routed_scaling_factor=2.5)),
    "solar_open-e6k3-nonorm-shared2-head_dim-tied-mqa": ("SolarOpenConfig", "SolarOpenForCausalLM", dict(
        n_routed_experts=6, num_experts_per_tok=3, moe_intermediate_size=16, n_shared_experts=2, norm_topk_prob=False,
        head_dim=12, num_key_value_heads=1, tie_word_embeddings=True, num_hidden_layers=3)),
    "glm4_moe_lite-e8k2-groups-dense-first-qlora": ("Glm4MoeLiteConfig", "Glm4MoeLiteForCausalLM", dict(
        n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1, moe_intermediate_size=16, n_shared_experts=1,
        num_hidden_layers=3, kv_lora_rank=16, q_lora_rank=20, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6,
        num_key_value_heads=4)),
    "glm4_moe_lite-e6k3-nonorm-all-sparse-halfsplit": ("Glm4MoeLiteConfig", "Glm4MoeLiteForCausalLM", dict(
        n_routed_experts=6, num_experts_per_tok=3, moe_intermediate_size=16, n_shared_experts=2,
        mlp_layer_types=["sparse", "sparse"], kv_lora_rank=12, q_lora_rank=None, qk_nope_head_dim=8,
        qk_rope_head_dim=8, v_head_dim=8, num_key_value_heads=4, norm_topk_prob=False, routed_scaling_factor=1.0,
        rope_interleave=False)),
    # Sarvam: GLM-4.5's and DeepSeek-V3's models, with their own configs (and Sarvam-30B's tensor names)
    "sarvam_moe-e8k2-groups-qknorm-qkv-bias-dense-first": ("SarvamMoEConfig", "Glm4MoeForCausalLM", dict(
        n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1, moe_intermediate_size=16, n_shared_experts=1,
        first_k_dense_replace=1, num_hidden_layers=3, head_dim=8, attention_bias=True)),
    "sarvam_mla-e6k3-dense-first": ("SarvamMLAConfig", "DeepseekV3ForCausalLM", dict(
        n_routed_experts=6, num_experts_per_tok=3, moe_intermediate_size=16, n_shared_experts=1, kv_lora_rank=16,
        qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6, num_key_value_heads=4, routed_scaling_factor=2.5)),
    # DBRX: d_model given (DbrxConfig sizes its experts from it), attn_config's rope_theta (DbrxAttention reads it,
    # though its rope does not) and clip_qkv (DbrxAttention clamps with it whether set or not)
    "dbrx-e4k2-clip": ("DbrxConfig", "DbrxForCausalLM", dict(
        d_model=32, attn_config=dict(kv_n_heads=2, clip_qkv=0.5, rope_theta=10000.0),
        ffn_config=dict(ffn_hidden_size=16, moe_num_experts=4, moe_top_k=2))),
    "dbrx-e8k3-unnormalised-gelu-mqa": ("DbrxConfig", "DbrxForCausalLM", dict(
        d_model=32, attn_config=dict(kv_n_heads=1, clip_qkv=2.0, rope_theta=10000.0), num_hidden_layers=3,
        ffn_config=dict(ffn_hidden_size=16, moe_num_experts=8, moe_top_k=3, moe_normalize_expert_weights=None,
                        ffn_act_fn=dict(name="gelu")))),
    # Granite-MoE-SWA: full layer 0 without rope, sliding layers 1-2; then full / sliding, rope everywhere
    "granitemoe_swa-e4k2-window-nope-shared": ("GraniteMoeSWAConfig", "GraniteMoeSWAForCausalLM", dict(
        num_local_experts=4, num_experts_per_tok=2, intermediate_size=16, shared_intermediate_size=24, sliding_window=4,
        num_hidden_layers=3, layer_rope_theta=[0, 10000.0, 10000.0], embedding_multiplier=12.0, residual_multiplier=0.22,
        attention_multiplier=0.3, logits_scaling=6.0)),
    "granitemoe_swa-e8k3-noshared-rope-theta-tied-mqa": ("GraniteMoeSWAConfig", "GraniteMoeSWAForCausalLM", dict(
        num_local_experts=8, num_experts_per_tok=3, intermediate_size=16, shared_intermediate_size=0, sliding_window=6,
        layer_types=["sliding_attention", "full_attention"], layer_rope_theta=[50000.0, 50000.0], num_key_value_heads=1,
        tie_word_embeddings=True, attention_multiplier=0.25)),
    "hy_v3-e8k2-dense-first-qkv-bias": ("HYV3Config", "HYV3ForCausalLM", dict(
        num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, num_shared_experts=1, head_dim=8,
        attention_bias=True, num_hidden_layers=3)),
    "hy_v3-e6k3-all-sparse-shared2-head_dim-tied-mqa": ("HYV3Config", "HYV3ForCausalLM", dict(
        num_experts=6, num_experts_per_tok=3, moe_intermediate_size=16, num_shared_experts=2, head_dim=12,
        mlp_layer_types=["sparse", "sparse"], num_key_value_heads=1, tie_word_embeddings=True, router_scaling_factor=1.0)),
    # Flint: layers full (rope-free), full, sliding, full by its default layer_types; then sliding, sparse step 2
    "flint-e8k2-sinks-window-nope-shared": ("FlintConfig", "FlintForCausalLM", dict(
        num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=24, head_dim=8,
        sliding_window=4, num_hidden_layers=4, mlp_only_layers=[0])),
    "flint-e6k3-nonorm-sparse-step-bias-tied-mqa": ("FlintConfig", "FlintForCausalLM", dict(
        num_experts=6, num_experts_per_tok=3, moe_intermediate_size=16, shared_expert_intermediate_size=16, head_dim=8,
        norm_topk_prob=False, decoder_sparse_step=2, mlp_only_layers=[], layer_types=["sliding_attention"] * 2,
        sliding_window=6, attention_bias=True, num_key_value_heads=1, tie_word_embeddings=True)),
    "aria_text-e4k2-shared-bias": ("AriaTextConfig", "AriaTextForCausalLM", dict(
        moe_num_experts=4, moe_topk=2, intermediate_size=16, moe_num_shared_experts=1, attention_bias=True)),
    "aria_text-e8k3-shared2-llama3-rope-tied-mqa": ("AriaTextConfig", "AriaTextForCausalLM", dict(
        moe_num_experts=8, moe_topk=3, intermediate_size=16, moe_num_shared_experts=2, num_key_value_heads=1,
        tie_word_embeddings=True, num_hidden_layers=3, rope_parameters=dict(
            rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
            original_max_position_embeddings=16))),
}

# Sigmoid routers (noaux_tc) saturate where a softmax router's margins widen: their weights are scaled
# modestly. Every e_score_correction_bias (DeepSeek-V3, GLM-4.5, ERNIE-4.5) is set to random values so that
# it moves the choice.
_SIGMOID_ROUTERS = ("DeepseekV3Config", "Glm4MoeConfig", "Dots1Config", "MiniMaxM2Config", "Llama4TextConfig",
                    "ExaoneMoeConfig", "SolarOpenConfig", "Glm4MoeLiteConfig",
                    "SarvamMoEConfig", "SarvamMLAConfig", "HYV3Config", "FlintConfig")
# Families whose transformers init leaves biases at 0 (and GPT-OSS's sinks small) where the checks need them
# to matter: every bias and sink is set to random values.
_RANDOM_BIASES = ("GptOssConfig", "PhimoeConfig", "GraniteMoeSWAConfig", "FlintConfig",
                  "AriaTextConfig")
_ROUTERS = ("mlp.gate.weight", "block_sparse_moe.gate.weight", "block_sparse_moe.router.weight", "mlp.router.weight",
            "feed_forward.router.weight", "ffn.router.layer.weight")


def build(name: str, seed: int = 0, router_scale: float | None = None):
    """A random transformers model of variant `name`, with its routers' weights scaled so that top-k
    choices have wide margins (float rounding cannot flip them): 8x for softmax routers, 2x for sigmoid ones."""
    config_cls, model_cls, kwargs = VARIANTS[name]
    sigmoid = config_cls in _SIGMOID_ROUTERS
    if router_scale is None:
        router_scale = 2.0 if sigmoid else 8.0
    config = getattr(transformers, config_cls)(**{**_BASE, **kwargs})
    config.eos_token_id = None  # generate exactly max_new_tokens
    config.pad_token_id = 0
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():
        generator = torch.Generator().manual_seed(seed + 2)
        for module_name, param in model.named_parameters():
            if module_name.endswith(_ROUTERS):
                param.mul_(router_scale)
            if config_cls in _RANDOM_BIASES and module_name.endswith(("bias", "sinks")):
                scale = 1.0 if module_name.endswith("sinks") else 0.1
                param.copy_(torch.randn(param.shape, generator=generator) * scale)
        for module_name, buffer in [*model.named_buffers(), *model.named_parameters()]:  # ERNIE: a parameter
            if module_name.endswith("e_score_correction_bias"):
                buffer.copy_(torch.rand(buffer.shape, generator=torch.Generator().manual_seed(seed + 1)) * 0.2)
    return model


def save(name: str, directory, seed: int = 0):
    model = build(name, seed)
    model.save_pretrained(directory)
    return model
