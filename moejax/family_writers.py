"""The family writers: a ModelConfig -> the keys of its family's Hugging Face config.json, the inverse of
moejax.family_readers. moejax.config.to_hf_config adds the keys every family shares and reads the result
back with the family's reader: a config the family cannot express is refused there, naming the field, so a
writer only says where each value goes.
"""

from __future__ import annotations

from typing import Callable


def rope_parameters(c) -> dict:
    """config.json's rope_parameters (transformers v5's spelling, which the readers take too)."""
    r = c.rope
    params = {"rope_type": r.kind, "rope_theta": r.theta}
    if r.kind in ("linear", "llama3", "yarn"):
        params["factor"] = r.factor
    if r.kind in ("llama3", "yarn", "longrope"):
        params["original_max_position_embeddings"] = r.original_max_position
    if r.kind == "longrope":
        params.update(short_factor=list(r.short_factor), long_factor=list(r.long_factor or r.short_factor),
                      short_mscale=r.short_mscale, long_mscale=r.long_mscale or r.short_mscale)
    if r.kind == "llama3":
        params.update(low_freq_factor=r.low_freq_factor, high_freq_factor=r.high_freq_factor)
    if r.kind == "yarn":
        params.update(beta_fast=r.beta_fast, beta_slow=r.beta_slow, truncate=r.truncate)
        params.update({k: v for k, v in (("mscale", r.mscale), ("mscale_all_dim", r.mscale_all_dim),
                                         ("attention_factor", r.attention_factor)) if v is not None})
    return params


def _moe_layer_indices(c) -> list[int]:
    return [i for i, moe in enumerate(c.moe_layers) if moe]


def _first_moe_layer(c) -> int:
    """first_k_dense_replace: the dense layers before the first MoE one."""
    return next((i for i, moe in enumerate(c.moe_layers) if moe), c.num_layers)


def _mixtral(c) -> dict:
    return dict(num_local_experts=c.num_experts, num_experts_per_tok=c.num_experts_per_tok,
                intermediate_size=c.moe_intermediate_size, sliding_window=c.sliding_window)


def _olmoe(c) -> dict:
    return dict(num_experts=c.num_experts, num_experts_per_tok=c.num_experts_per_tok,
                intermediate_size=c.moe_intermediate_size, norm_topk_prob=c.norm_topk_prob, clip_qkv=c.clip_qkv,
                attention_bias=c.qkv_bias)


def _qwen_moe(c) -> dict:
    """Qwen2-MoE's and Qwen3-MoE's keys (the MoE layers as mlp_only_layers' complement)."""
    return dict(num_experts=c.num_experts, num_experts_per_tok=c.num_experts_per_tok,
                moe_intermediate_size=c.moe_intermediate_size,
                intermediate_size=c.intermediate_size or c.moe_intermediate_size, norm_topk_prob=c.norm_topk_prob,
                decoder_sparse_step=1, mlp_only_layers=[i for i, moe in enumerate(c.moe_layers) if not moe])


def _qwen2_moe(c) -> dict:
    return dict(_qwen_moe(c), shared_expert_intermediate_size=c.shared_expert_intermediate_size, qkv_bias=c.qkv_bias,
                use_sliding_window=False)


def _qwen3_moe(c) -> dict:
    return dict(_qwen_moe(c), attention_bias=c.qkv_bias, use_sliding_window=c.sliding_window is not None,
                sliding_window=c.sliding_window)


def _latent_attention(c) -> dict:
    return dict(attention_bias=c.qkv_bias, q_lora_rank=c.q_lora_rank, kv_lora_rank=c.kv_lora_rank,
                qk_nope_head_dim=c.qk_nope_head_dim, qk_rope_head_dim=c.qk_rope_head_dim, v_head_dim=c.v_head_dim)


def _deepseek(c) -> dict:
    """DeepSeek-V2's and -V3's keys: latent attention, routed and shared experts, dense first layers."""
    shared = c.shared_expert_intermediate_size // c.moe_intermediate_size if c.moe_intermediate_size else 0
    return dict(_latent_attention(c), intermediate_size=c.intermediate_size, first_k_dense_replace=_first_moe_layer(c),
                moe_layer_freq=1, **_routed(c), n_shared_experts=shared)


def _routed(c) -> dict:
    return dict(n_routed_experts=c.num_experts, num_experts_per_tok=c.num_experts_per_tok,
                moe_intermediate_size=c.moe_intermediate_size, norm_topk_prob=c.norm_topk_prob, n_group=c.n_group,
                topk_group=c.topk_group, routed_scaling_factor=c.routed_scaling_factor,
                topk_method=c.topk_method, scoring_func=c.scoring_func)


def _deepseek_v3(c) -> dict:
    return dict(_deepseek(c), rope_interleave=c.rope.interleaved, num_nextn_predict_layers=c.mtp_layers)


def _glm4_moe(c) -> dict:
    shared = c.shared_expert_intermediate_size // c.moe_intermediate_size
    return dict(_routed(c), attention_bias=c.qkv_bias, use_qk_norm=c.head_qk_norm,
                partial_rotary_factor=c.rope_dim / c.head_dim, intermediate_size=c.intermediate_size,
                first_k_dense_replace=_first_moe_layer(c), n_shared_experts=shared,
                num_nextn_predict_layers=c.mtp_layers)


def _dots1(c) -> dict:
    shared = c.shared_expert_intermediate_size // c.moe_intermediate_size
    kinds = [c.attention_kind(i) for i in range(c.num_layers)]
    return dict(_routed(c), attention_bias=c.qkv_bias, intermediate_size=c.intermediate_size,
                first_k_dense_replace=_first_moe_layer(c), n_shared_experts=shared, sliding_window=c.sliding_window,
                layer_types=kinds)


def _ernie4_5_moe(c) -> dict:
    moe = _moe_layer_indices(c) or [c.num_layers]
    # the interval of the MoE layers' pattern ((i + 1) % interval == 0 within [start, end]); the read-back
    # check refuses any other pattern
    interval = moe[1] - moe[0] if len(moe) > 1 else moe[0] + 1
    return dict(moe_num_experts=c.num_experts, moe_k=c.num_experts_per_tok, moe_intermediate_size=c.moe_intermediate_size,
                moe_num_shared_experts=c.shared_expert_intermediate_size // c.moe_intermediate_size,
                moe_layer_start_index=moe[0], moe_layer_end_index=moe[-1], moe_layer_interval=interval,
                intermediate_size=c.intermediate_size, use_bias=False)


def _mlp_layer_types(c) -> list[str]:
    return ["sparse" if moe else "dense" for moe in c.moe_layers]


def _exaone_moe(c) -> dict:
    # rope on the sliding layers only: the read-back check refuses a config with rope elsewhere
    return dict(num_experts=c.num_experts, num_experts_per_tok=c.num_experts_per_tok,
                moe_intermediate_size=c.moe_intermediate_size,
                num_shared_experts=c.shared_expert_intermediate_size // c.moe_intermediate_size,
                norm_topk_prob=c.norm_topk_prob, routed_scaling_factor=c.routed_scaling_factor, n_group=c.n_group,
                topk_group=c.topk_group, intermediate_size=c.intermediate_size, sliding_window=c.sliding_window,
                layer_types=[c.attention_kind(i) for i in range(c.num_layers)], mlp_layer_types=_mlp_layer_types(c))


def _solar_open(c) -> dict:
    return dict(_routed(c), n_shared_experts=c.shared_expert_intermediate_size // c.moe_intermediate_size,
                attention_bias=c.qkv_bias)


def _glm4_moe_lite(c) -> dict:
    return dict(_latent_attention(c), **_routed(c),
                n_shared_experts=c.shared_expert_intermediate_size // c.moe_intermediate_size,
                intermediate_size=c.intermediate_size, mlp_layer_types=_mlp_layer_types(c),
                rope_interleave=c.rope.interleaved, num_nextn_predict_layers=c.mtp_layers)


def _dbrx(c) -> dict:
    # DbrxConfig's own names too: it sizes the experts from d_model, not from its alias hidden_size
    return dict(d_model=c.hidden_size, n_heads=c.num_heads, n_layers=c.num_layers,
                max_seq_len=c.max_position_embeddings, attn_config=dict(kv_n_heads=c.num_kv_heads, clip_qkv=c.clip_qkv, rope_theta=c.rope.theta),
                ffn_config=dict(ffn_hidden_size=c.moe_intermediate_size, moe_num_experts=c.num_experts,
                                moe_top_k=c.num_experts_per_tok, ffn_act_fn={"name": c.hidden_act},
                                moe_normalize_expert_weights=1.0 if c.norm_topk_prob else None))


def _hy_v3(c) -> dict:
    return dict(num_experts=c.num_experts, num_experts_per_tok=c.num_experts_per_tok,
                moe_intermediate_size=c.moe_intermediate_size,
                num_shared_experts=c.shared_expert_intermediate_size // c.moe_intermediate_size,
                router_scaling_factor=c.routed_scaling_factor, attention_bias=c.qkv_bias,
                intermediate_size=c.intermediate_size, mlp_layer_types=_mlp_layer_types(c))


def _flint(c) -> dict:
    return dict(_qwen_moe(c), shared_expert_intermediate_size=c.shared_expert_intermediate_size,
                attention_bias=c.qkv_bias, sliding_window=c.sliding_window, layer_types=[c.attention_kind(i) for i in range(c.num_layers)])


def _aria_text(c) -> dict:
    return dict(moe_num_experts=c.num_experts, moe_topk=c.num_experts_per_tok,
                intermediate_size=c.moe_intermediate_size, moe_num_shared_experts=c.shared_expert_intermediate_size // c.moe_intermediate_size,
                attention_bias=c.qkv_bias)


def _minimax_m2(c) -> dict:
    return dict(num_local_experts=c.num_experts, num_experts_per_tok=c.num_experts_per_tok,
                intermediate_size=c.moe_intermediate_size, rotary_dim=c.rope_dim, qk_norm_type="per_layer",
                scoring_func=c.scoring_func, topk_method=c.topk_method)


def _granitemoe(c) -> dict:
    keys = dict(num_local_experts=c.num_experts, num_experts_per_tok=c.num_experts_per_tok,
                intermediate_size=c.moe_intermediate_size, attention_bias=c.qkv_bias,
                embedding_multiplier=c.embedding_multiplier, residual_multiplier=c.residual_multiplier,
                attention_multiplier=c.attention_scale, logits_scaling=c.logits_scaling)
    if c.architecture != "granitemoe":
        keys["shared_intermediate_size"] = c.shared_expert_intermediate_size
    return keys


def _granitemoe_swa(c) -> dict:
    return dict(_granitemoe(c), sliding_window=c.sliding_window,
                layer_types=[c.attention_kind(i) for i in range(c.num_layers)], layer_rope_theta=[c.rope.theta if c.uses_rope(i) else 0 for i in range(c.num_layers)])


def _gpt_oss(c) -> dict:
    return dict(num_local_experts=c.num_experts, num_experts_per_tok=c.num_experts_per_tok,
                intermediate_size=c.moe_intermediate_size, attention_bias=c.qkv_bias, sliding_window=c.sliding_window,
                layer_types=[c.attention_kind(i) for i in range(c.num_layers)], swiglu_limit=c.swiglu_limit,
                swiglu_alpha=c.swiglu_alpha)


def _llama4_text(c) -> dict:
    return dict(num_local_experts=c.num_experts, num_experts_per_tok=c.num_experts_per_tok,
                intermediate_size=c.moe_intermediate_size, intermediate_size_mlp=c.intermediate_size,
                moe_layers=_moe_layer_indices(c), no_rope_layers=[int(c.uses_rope(i)) for i in range(c.num_layers)],
                layer_types=[c.attention_kind(i) for i in range(c.num_layers)],
                attention_chunk_size=c.attention_chunk_size, use_qk_norm=c.qk_l2_norm,
                attn_temperature_tuning=c.attn_temperature_tuning, floor_scale=c.floor_scale, attn_scale=c.attn_scale,
                attention_bias=c.qkv_bias)


def _phimoe(c) -> dict:
    return dict(num_local_experts=c.num_experts, num_experts_per_tok=c.num_experts_per_tok,
                intermediate_size=c.moe_intermediate_size, attention_bias=c.qkv_bias, lm_head_bias=c.lm_head_bias,
                sliding_window=c.sliding_window, router_jitter_noise=c.router_jitter_eps)


WRITERS: dict[str, Callable] = {
    "mixtral": _mixtral, "olmoe": _olmoe, "qwen2_moe": _qwen2_moe, "qwen3_moe": _qwen3_moe, "deepseek_v2": _deepseek,
    "deepseek_v3": _deepseek_v3, "glm4_moe": _glm4_moe, "dots1": _dots1, "ernie4_5_moe": _ernie4_5_moe,
    "minimax_m2": _minimax_m2, "granitemoe": _granitemoe, "granitemoeshared": _granitemoe, "gpt_oss": _gpt_oss,
    "llama4_text": _llama4_text, "phimoe": _phimoe, "exaone_moe": _exaone_moe,
    "solar_open": _solar_open, "glm4_moe_lite": _glm4_moe_lite, "sarvam_moe": _glm4_moe, "dbrx": _dbrx,
    "granitemoe_swa": _granitemoe_swa, "hy_v3": _hy_v3,
    "flint": _flint, "aria_text": _aria_text}
