"""The family readers: a Hugging Face config.json dict -> the ModelConfig fields of its model_type, one
reader per family (moejax.families says which model types are read; moejax.config.from_hf_config checks the
JSON types first and builds the ModelConfig).

Every detail a family's transformers implementation reads is read here, none assumed from the family name;
a setting transformers would compute differently from moejax is refused naming the key. The rope fields come
back as a dict of RopeConfig fields.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

def _get(hf: dict, key: str, default: Any = dataclasses.MISSING) -> Any:
    if key in hf and hf[key] is not None:
        return hf[key]
    if default is dataclasses.MISSING:
        raise ValueError(f"config.json: required key {key!r} is missing (model_type={hf.get('model_type')!r})")
    return default


def _rope(hf: dict, interleaved: bool = False) -> dict:
    # transformers v5 writes `rope_parameters` (theta inside); v4 and the Hub write rope_theta + rope_scaling.
    # As transformers reads them: a rope_scaling replaces rope_parameters whole (a model card's "add
    # rope_scaling for YaRN" on a v5 config), the theta from it, else the top level (family_defaults' default)
    params = dict(hf.get("rope_scaling") or hf.get("rope_parameters") or {})
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    factor = float(params.get("factor") or 1.0)
    return dict(
        theta=float(theta), kind=kind, factor=factor,
        original_max_position=params.get("original_max_position_embeddings"),
        beta_fast=float(params.get("beta_fast") or 32.0), beta_slow=float(params.get("beta_slow") or 1.0),
        mscale=params.get("mscale"), mscale_all_dim=params.get("mscale_all_dim"),
        attention_factor=params.get("attention_factor"), truncate=bool(params.get("truncate", True)),
        short_factor=_floats(params.get("short_factor")), short_mscale=params.get("short_mscale"),
        long_factor=_floats(params.get("long_factor")), long_mscale=params.get("long_mscale"),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)), interleaved=interleaved)


def _floats(values) -> tuple[float, ...] | None:
    return None if values is None else tuple(float(v) for v in values)


def _common(hf: dict) -> dict:
    heads = _get(hf, "num_attention_heads")
    hidden = _get(hf, "hidden_size")
    return dict(
        vocab_size=_get(hf, "vocab_size"), hidden_size=hidden, num_layers=_get(hf, "num_hidden_layers"),
        num_heads=heads, num_kv_heads=_get(hf, "num_key_value_heads", heads),
        head_dim=_get(hf, "head_dim", hidden // heads), rms_norm_eps=float(_get(hf, "rms_norm_eps", 1e-6)),
        rope=_rope(hf), max_position_embeddings=_get(hf, "max_position_embeddings", 4096),
        hidden_act=_get(hf, "hidden_act", "silu"), tie_word_embeddings=bool(_get(hf, "tie_word_embeddings", False)),
        bos_token_id=hf.get("bos_token_id"), eos_token_id=_token_ids(hf.get("eos_token_id")),
        pad_token_id=hf.get("pad_token_id"))


def _token_ids(v):
    return tuple(v) if isinstance(v, list) else v


def _mixtral(hf: dict) -> dict:
    n = _get(hf, "num_hidden_layers")
    return dict(_common(hf), sliding_window=hf.get("sliding_window"),
                intermediate_size=_get(hf, "intermediate_size"), moe_layers=(True,) * n,
                num_experts=_get(hf, "num_local_experts"), num_experts_per_tok=_get(hf, "num_experts_per_tok"),
                moe_intermediate_size=_get(hf, "intermediate_size"), norm_topk_prob=True)


def _olmoe(hf: dict) -> dict:
    n = _get(hf, "num_hidden_layers")
    bias = bool(_get(hf, "attention_bias", False))
    return dict(_common(hf), qkv_bias=bias, o_bias=bias, qk_norm=True, clip_qkv=hf.get("clip_qkv"),
                intermediate_size=_get(hf, "intermediate_size"), moe_layers=(True,) * n,
                num_experts=_get(hf, "num_experts"), num_experts_per_tok=_get(hf, "num_experts_per_tok"),
                moe_intermediate_size=_get(hf, "intermediate_size"),
                norm_topk_prob=bool(_get(hf, "norm_topk_prob", False)))


def _qwen_sparse_layers(hf: dict, experts: int) -> tuple[bool, ...]:
    """Qwen's MoE layers: every decoder_sparse_step-th layer, except those of mlp_only_layers."""
    step = _get(hf, "decoder_sparse_step", 1)
    mlp_only = set(_get(hf, "mlp_only_layers", []))
    return tuple(i not in mlp_only and experts > 0 and (i + 1) % step == 0 for i in range(_get(hf, "num_hidden_layers")))


def _qwen2_moe(hf: dict) -> dict:
    if hf.get("use_sliding_window"):
        raise ValueError("config.json: use_sliding_window=True (Qwen2-MoE per-layer sliding windows) is not "
                         "supported yet; set it to false")
    experts = _get(hf, "num_experts")
    sparse = _qwen_sparse_layers(hf, experts)
    return dict(_common(hf), qkv_bias=bool(_get(hf, "qkv_bias", True)),
                intermediate_size=_get(hf, "intermediate_size"), moe_layers=sparse, num_experts=experts,
                num_experts_per_tok=_get(hf, "num_experts_per_tok"),
                moe_intermediate_size=_get(hf, "moe_intermediate_size"),
                norm_topk_prob=bool(_get(hf, "norm_topk_prob", False)),
                shared_expert_intermediate_size=_get(hf, "shared_expert_intermediate_size", 0),
                shared_expert_gate=_get(hf, "shared_expert_intermediate_size", 0) > 0)


def _deepseek_v2(hf: dict) -> dict:
    if _get(hf, "mlp_bias", False):
        raise ValueError("config.json: mlp_bias=True is not supported for deepseek_v2")
    experts = _get(hf, "n_routed_experts", 0) or 0
    sparse = _dense_first(hf, experts)  # transformers ignores moe_layer_freq: refused unless 1
    common = _common(hf)
    common["rope"] = _rope(hf, interleaved=True)
    return dict(common, **_latent_attention(hf), intermediate_size=_get(hf, "intermediate_size"), moe_layers=sparse,
                num_experts=experts,
                num_experts_per_tok=_get(hf, "num_experts_per_tok", 0) or 0,
                moe_intermediate_size=_get(hf, "moe_intermediate_size", 0),
                norm_topk_prob=bool(_get(hf, "norm_topk_prob", False)),
                topk_method=_get(hf, "topk_method", "greedy"), n_group=_get(hf, "n_group", 1),
                topk_group=_get(hf, "topk_group", 1),
                routed_scaling_factor=float(_get(hf, "routed_scaling_factor", 1.0)),
                shared_expert_intermediate_size=(_get(hf, "n_shared_experts", 0) or 0)
                * _get(hf, "moe_intermediate_size", 0))


def _qwen3_moe(hf: dict) -> dict:
    # the Hub's configs say num_experts; transformers v5 writes the attribute it maps to, num_local_experts
    experts = _get(hf, "num_experts") if hf.get("num_experts") is not None else _get(hf, "num_local_experts")
    bias = bool(_get(hf, "attention_bias", False))
    return dict(_common(hf), qkv_bias=bias, o_bias=bias, head_qk_norm=True,
                sliding_window=hf.get("sliding_window") if hf.get("use_sliding_window") else None,
                intermediate_size=_get(hf, "intermediate_size"), moe_layers=_qwen_sparse_layers(hf, experts),
                num_experts=experts, num_experts_per_tok=_get(hf, "num_experts_per_tok"),
                moe_intermediate_size=_get(hf, "moe_intermediate_size"),
                norm_topk_prob=bool(_get(hf, "norm_topk_prob", False)))


def _granitemoe(hf: dict) -> dict:
    bias = bool(_get(hf, "attention_bias", False))
    shared = _get(hf, "shared_intermediate_size", 0) if hf.get("model_type") != "granitemoe" else 0
    return dict(_common(hf), qkv_bias=bias, o_bias=bias, intermediate_size=_get(hf, "intermediate_size"),
                moe_layers=(True,) * _get(hf, "num_hidden_layers"), num_experts=_get(hf, "num_local_experts"),
                num_experts_per_tok=_get(hf, "num_experts_per_tok"), moe_intermediate_size=_get(hf, "intermediate_size"),
                norm_topk_prob=True,  # softmax over the top-k logits: the top-k probabilities renormalised
                shared_expert_intermediate_size=shared,
                embedding_multiplier=float(_get(hf, "embedding_multiplier", 1.0)),
                residual_multiplier=float(_get(hf, "residual_multiplier", 1.0)),
                attention_multiplier=float(_get(hf, "attention_multiplier", 1.0)),
                logits_scaling=float(_get(hf, "logits_scaling", 1.0)))


def _granitemoe_swa(hf: dict) -> dict:
    """Granite-MoE with shared experts, attention sinks, sliding and full layers by layer_types (default: every
    fourth from the first full) and rope per layer by layer_rope_theta (0: no rope), one theta for all the rest."""
    hf = {"sliding_window": 128, **hf}  # GraniteMoeSWAConfig's default
    n = _get(hf, "num_hidden_layers")
    types = hf.get("layer_types") or ["full_attention" if i % 4 == 0 else "sliding_attention" for i in range(n)]
    fields = _granitemoe(hf)
    thetas = hf.get("layer_rope_theta") or [fields["rope"]["theta"]] * n
    if len(thetas) != n or len({t for t in thetas if t}) > 1:
        raise ValueError(f"config.json: layer_rope_theta={thetas!r} is not supported: moejax rotates every rope layer "
                         f"with one theta (and no rope where 0); one entry per layer ({n})")
    fields["rope"]["theta"] = float(next((t for t in thetas if t), fields["rope"]["theta"]))
    return dict(fields, attention_sinks=True, layer_types=tuple(types), sliding_window=hf.get("sliding_window"),
                rope_layers=tuple(bool(t) for t in thetas))


def _ernie4_5_moe(hf: dict) -> dict:
    hf = {"tie_word_embeddings": True, "rope_theta": 500000.0, **hf}  # Ernie4_5_MoeConfig's defaults
    if _get(hf, "use_bias", False):
        raise ValueError("config.json: use_bias=True (ERNIE-4.5 biases on every linear layer and the LM head) is "
                         "not supported; supported: false")
    n, experts, k = _get(hf, "num_hidden_layers"), _get(hf, "moe_num_experts"), _get(hf, "moe_k")
    end = _get(hf, "moe_layer_end_index", -1)
    end = n - 1 if end == -1 else end
    start, interval = _get(hf, "moe_layer_start_index", 1), _get(hf, "moe_layer_interval", 1)
    # the top-k weights are divided by max(their sum, moe_norm_min); the top-k softmax probabilities sum to
    # at least k / E, so that is plain renormalisation unless moe_norm_min exceeds k / E
    if _get(hf, "moe_norm_min", 1e-12) > k / experts:
        raise ValueError(f"config.json: moe_norm_min={hf['moe_norm_min']!r} is not supported: above moe_k / "
                         f"moe_num_experts = {k / experts} it clamps the renormalisation")
    common = _common(hf)
    common["rope"] = _rope(hf, interleaved=True)
    return dict(common, intermediate_size=_get(hf, "intermediate_size"),
                moe_layers=tuple((i + 1) % interval == 0 and start <= i <= end for i in range(n)),
                num_experts=experts, num_experts_per_tok=k, moe_intermediate_size=_get(hf, "moe_intermediate_size"),
                norm_topk_prob=True, topk_method="noaux_tc",  # softmax scores, the choice biased; one group
                shared_expert_intermediate_size=_get(hf, "moe_num_shared_experts", 0) * _get(hf, "moe_intermediate_size"))


def _sigmoid_router(hf: dict, experts: int, norm_topk_prob: bool = True) -> dict:
    """DeepSeek-V3's router as transformers computes it for deepseek_v3 and glm4_moe (noaux_tc, sigmoid
    scores); a config.json naming another topk_method or scoring_func is refused, not silently recomputed."""
    for key, value in (("topk_method", "noaux_tc"), ("scoring_func", "sigmoid")):
        if _get(hf, key, value) != value:
            raise ValueError(f"config.json: {key}={hf[key]!r} is not supported for {hf.get('model_type')}; "
                             f"supported: {value!r}")
    shared = _get(hf, "n_shared_experts", 0) * _get(hf, "moe_intermediate_size", 0)
    return dict(num_experts=experts, num_experts_per_tok=_get(hf, "num_experts_per_tok", 0) or 0,
                moe_intermediate_size=_get(hf, "moe_intermediate_size", 0),
                norm_topk_prob=bool(_get(hf, "norm_topk_prob", norm_topk_prob)), scoring_func="sigmoid", topk_method="noaux_tc",
                n_group=_get(hf, "n_group", 1), topk_group=_get(hf, "topk_group", 1),
                routed_scaling_factor=float(_get(hf, "routed_scaling_factor", 1.0)),
                shared_expert_intermediate_size=shared, mtp_layers=_get(hf, "num_nextn_predict_layers", 0))


def _dense_first(hf: dict, experts: int) -> tuple[bool, ...]:
    """MoE layers from first_k_dense_replace on (DeepSeek-V2 / V3, GLM-4.5)."""
    if _get(hf, "moe_layer_freq", 1) != 1:
        raise ValueError(f"config.json: moe_layer_freq={hf['moe_layer_freq']!r} is not supported for "
                         f"{hf.get('model_type')} (transformers makes every layer from first_k_dense_replace MoE); "
                         "supported: 1")
    first_dense = _get(hf, "first_k_dense_replace", 0)
    return tuple(experts > 0 and i >= first_dense for i in range(_get(hf, "num_hidden_layers")))


def _mlp_layer_types(hf: dict, default: list[str]) -> tuple[bool, ...]:
    """The MoE layers from mlp_layer_types ("dense" or "sparse" per layer; EXAONE-MoE, GLM-4.7-Flash, Hy3), else
    from `default`, the family's derivation transformers applies when the key is absent."""
    n = _get(hf, "num_hidden_layers")
    types = hf.get("mlp_layer_types") or default
    if len(types) != n or not set(types) <= {"dense", "sparse"}:
        raise ValueError(f"config.json: mlp_layer_types={types!r} needs one 'dense' or 'sparse' per layer ({n})")
    return tuple(t == "sparse" for t in types)


def _latent_attention(hf: dict) -> dict:
    """DeepSeek's multi-head latent attention fields (DeepSeek-V2 / V3, GLM-4.7-Flash)."""
    bias = bool(_get(hf, "attention_bias", False))
    return dict(qkv_bias=bias, o_bias=bias, q_lora_rank=hf.get("q_lora_rank"), kv_lora_rank=_get(hf, "kv_lora_rank"),
                qk_nope_head_dim=_get(hf, "qk_nope_head_dim"), qk_rope_head_dim=_get(hf, "qk_rope_head_dim"),
                v_head_dim=_get(hf, "v_head_dim"))


def _deepseek_v3(hf: dict) -> dict:
    experts = _get(hf, "n_routed_experts", 0) or 0
    common = _common(hf)
    common["rope"] = _rope(hf, interleaved=bool(_get(hf, "rope_interleave", True)))
    return dict(common, **_latent_attention(hf), intermediate_size=_get(hf, "intermediate_size"),
                moe_layers=_dense_first(hf, experts), **_sigmoid_router(hf, experts))


def _glm4_moe_lite(hf: dict) -> dict:
    """GLM-4.7-Flash: DeepSeek-V3's latent attention with GLM-4.5's MoE block; dense layers by mlp_layer_types
    (default: the first)."""
    hf = {"rms_norm_eps": 1e-5, "max_position_embeddings": 202752, "kv_lora_rank": 512, "q_lora_rank": 768,
          "qk_rope_head_dim": 64, "v_head_dim": 256, "qk_nope_head_dim": 192, "n_routed_experts": 64,
          "n_shared_experts": 1, "num_experts_per_tok": 4, "routed_scaling_factor": 1.8, "norm_topk_prob": True,
          **hf}  # Glm4MoeLiteConfig's defaults
    if _partial_rotary_factor(hf, 1.0) != 1.0:  # transformers would shorten the rope key's angles
        raise ValueError(f"config.json: partial_rotary_factor={_partial_rotary_factor(hf, 1.0)!r} is not supported for "
                         "glm4_moe_lite (latent attention rotates all of qk_rope_head_dim); supported: 1.0")
    n = _get(hf, "num_hidden_layers")
    common = _common(hf)
    # Glm4MoeLiteConfig maps head_dim to qk_rope_head_dim, as DeepseekV3Config sets it
    common.update(head_dim=_get(hf, "qk_rope_head_dim"),
                  rope=_rope(hf, interleaved=bool(_get(hf, "rope_interleave", True))))
    return dict(common, **_latent_attention(hf), intermediate_size=_get(hf, "intermediate_size"),
                moe_layers=_mlp_layer_types(hf, ["dense"] + ["sparse"] * (n - 1)),
                **_sigmoid_router(hf, _get(hf, "n_routed_experts")))


def _partial_rotary_factor(hf: dict, default: float) -> float:
    # transformers v5 keeps partial_rotary_factor in rope_parameters; the Hub's configs at the top level
    return (hf.get("rope_parameters") or {}).get("partial_rotary_factor", _get(hf, "partial_rotary_factor", default))


def _glm4_moe(hf: dict, partial_rotary_factor: float = 0.5) -> dict:
    """GLM-4.5; `partial_rotary_factor`: the default where config.json gives none (Glm4MoeConfig's 0.5)."""
    experts = _get(hf, "n_routed_experts", 0) or 0
    common = _common(hf)
    factor = _partial_rotary_factor(hf, partial_rotary_factor)
    return dict(common, qkv_bias=bool(_get(hf, "attention_bias", False)), head_qk_norm=bool(_get(hf, "use_qk_norm", False)),
                rotary_dim=int(common["head_dim"] * factor), intermediate_size=_get(hf, "intermediate_size"),
                moe_layers=_dense_first(hf, experts), **_sigmoid_router(hf, experts))


def _aliased(hf: dict, attribute_map: dict[str, str]) -> dict:
    """hf with each alias key of a config class's attribute_map renamed to the key it stands for (the Hub's
    configs write the alias; transformers reads either), the key itself winning where both are given."""
    hf = dict(hf)
    for alias, key in attribute_map.items():
        value = hf.pop(alias, None)
        if value is not None and hf.get(key) is None:
            hf[key] = value
    return hf


def _sarvam_moe(hf: dict) -> dict:
    """Sarvam-30B: GLM-4.5's model (transformers builds Glm4MoeForCausalLM for it), with per-head q/k norm and
    full rotary by default; its checkpoints name the attention's tensors their own way (the load plan)."""
    hf = _aliased(hf, {"num_experts": "n_routed_experts", "num_local_experts": "n_routed_experts",
                       "num_shared_experts": "n_shared_experts", "use_qkv_bias": "attention_bias",
                       "num_mtp_layers": "num_nextn_predict_layers"})
    hf = {"rope_theta": 8000000.0, "head_dim": 64, "intermediate_size": 8192, "moe_intermediate_size": 1024,
          "n_routed_experts": 128, "n_shared_experts": 1, "num_experts_per_tok": 6, "routed_scaling_factor": 2.5,
          "first_k_dense_replace": 1, "norm_topk_prob": True, "use_qk_norm": True, **hf}  # SarvamMoEConfig's
    return _glm4_moe(hf, partial_rotary_factor=1.0)


def _sarvam_mla(hf: dict) -> dict:
    """Sarvam-105B: DeepSeek-V3's model; its older config.json's keys converted as SarvamMLAConfig converts them
    (head_dim and q_head_dim dropped, rope type deepseek_yarn read as yarn)."""
    hf = _aliased(hf, {"num_experts": "n_routed_experts", "num_local_experts": "n_routed_experts",
                       "num_shared_experts": "n_shared_experts", "num_mtp_layers": "num_nextn_predict_layers"})
    hf = {"n_routed_experts": 128, "n_group": 1, "topk_group": 1, "first_k_dense_replace": 1, **hf}  # SarvamMLAConfig's
    hf = {k: v for k, v in hf.items() if k != "q_head_dim"}
    hf["head_dim"] = _get(hf, "qk_rope_head_dim")  # as DeepseekV3Config sets it
    scaling = hf.get("rope_scaling") or {}
    if "deepseek_yarn" in (scaling.get("type"), scaling.get("rope_type")):
        hf["rope_scaling"] = {**{k: v for k, v in scaling.items() if k != "type"}, "rope_type": "yarn"}
    return _deepseek_v3(hf)


def _dots1(hf: dict) -> dict:
    """dots.llm1: Qwen3's attention (per-head q/k norm) with DeepSeek-V3's router, shared experts, dense first
    layers; its layer_types (default: sliding from max_window_layers on) must give every layer one kind."""
    n, experts, window = _get(hf, "num_hidden_layers"), _get(hf, "n_routed_experts"), hf.get("sliding_window")
    types = hf.get("layer_types") or ["sliding_attention" if window is not None and i >= _get(hf, "max_window_layers", 62)
                                      else "full_attention" for i in range(n)]
    if len(set(types)) != 1 or types[0] not in ("full_attention", "sliding_attention"):
        raise ValueError(f"config.json: layer_types={types!r} is not supported for dots1: moejax runs one kind of "
                         "attention in every layer ('full_attention' or 'sliding_attention')")
    bias = bool(_get(hf, "attention_bias", False))
    return dict(_common(hf), qkv_bias=bias, o_bias=bias, head_qk_norm=True,
                sliding_window=window if types[0] == "sliding_attention" else None,
                intermediate_size=_get(hf, "intermediate_size"), moe_layers=_dense_first(hf, experts),
                **_sigmoid_router(hf, experts, norm_topk_prob=False))


def _exaone_moe(hf: dict) -> dict:
    """K-EXAONE: per-head q/k RMSNorm before rope; sliding and full layers by layer_types (default: every
    sliding_window_pattern-th layer full), the full ones rope-free (ExaoneMoeConfig always sets a sliding_window);
    DeepSeek-V3's sigmoid router with shared experts; dense layers by mlp_layer_types (default: the
    first_k_dense_replace first)."""
    hf = {"rms_norm_eps": 1e-5, "max_position_embeddings": 2048, "sliding_window": 4096, "sliding_window_pattern": 4,
          "first_k_dense_replace": 1, "num_experts": 64, "num_experts_per_tok": 8, "moe_intermediate_size": 1024,
          "num_shared_experts": 1, "norm_topk_prob": True, "routed_scaling_factor": 2.5, **hf}  # ExaoneMoeConfig's
    n, window, types = _get(hf, "num_hidden_layers"), _get(hf, "sliding_window"), hf.get("layer_types")
    if types is None:
        pattern = hf.get("sliding_window_pattern")
        if isinstance(pattern, bool) or not isinstance(pattern, int) or pattern <= 0:
            raise ValueError(f"config.json: sliding_window_pattern={pattern!r} is not supported for exaone_moe: "
                             "transformers derives layer_types from a positive integer; give layer_types instead")
        types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n)]
    first_dense = _get(hf, "first_k_dense_replace")
    router = {**hf, "n_shared_experts": _get(hf, "num_shared_experts"), "num_nextn_predict_layers": 0}  # mtp.* unread
    return dict(_common(hf), head_qk_norm=True, sliding_window=window, layer_types=tuple(types),
                rope_layers=tuple(t == "sliding_attention" for t in types),
                intermediate_size=_get(hf, "intermediate_size"),
                moe_layers=_mlp_layer_types(hf, ["dense" if i < first_dense else "sparse" for i in range(n)]),
                **_sigmoid_router(router, _get(hf, "num_experts")))


def _solar_open(hf: dict) -> dict:
    """Solar Open: Llama's attention (biases on q, k, v only; full rotary) and GLM-4.5's MoE block in every
    layer (sigmoid router, shared experts)."""
    hf = {"rope_theta": 1000000.0, "rms_norm_eps": 1e-5, "head_dim": 128, "max_position_embeddings": 131072,
          "n_routed_experts": 128, "num_experts_per_tok": 8, "moe_intermediate_size": 1280, "n_shared_experts": 1,
          "norm_topk_prob": True, **hf}  # SolarOpenConfig's defaults
    if _partial_rotary_factor(hf, 1.0) != 1.0:
        raise ValueError(f"config.json: partial_rotary_factor={_partial_rotary_factor(hf, 1.0)!r} is not supported for "
                         "solar_open (its attention rotates every dimension of a head); supported: 1.0")
    router = {**hf, "num_nextn_predict_layers": 0}  # transformers builds no multi-token-prediction layers here
    return dict(_common(hf), qkv_bias=bool(_get(hf, "attention_bias", False)),
                moe_layers=(True,) * _get(hf, "num_hidden_layers"),
                **_sigmoid_router(router, _get(hf, "n_routed_experts")))


def _hy_v3(hf: dict) -> dict:
    """Hy3: Llama's attention with per-head q/k RMSNorm before rope; a sigmoid router whose choice adds the block's
    e_score_correction_bias, top-k weights renormalised and scaled by router_scaling_factor; shared experts; dense
    layers by mlp_layer_types (default: the first). enable_moe_fp32_combine changes rounding only."""
    hf = {"rope_theta": 11158840.0, "rms_norm_eps": 1e-5, "head_dim": 128, "max_position_embeddings": 131072,
          "num_experts": 192, "num_experts_per_tok": 8, "num_shared_experts": 1, "moe_intermediate_size": 1536,
          "router_scaling_factor": 2.826, **hf}  # HYV3Config's defaults
    if _get(hf, "mlp_bias", False):
        raise ValueError("config.json: mlp_bias=True is not supported for hy_v3 (biased dense and shared MLPs)")
    n, bias = _get(hf, "num_hidden_layers"), bool(_get(hf, "attention_bias", False))
    router = {**hf, "n_shared_experts": _get(hf, "num_shared_experts"), "norm_topk_prob": True, "n_group": 1,
              "topk_group": 1, "routed_scaling_factor": _get(hf, "router_scaling_factor"),
              # transformers skips the one multi-token-prediction layer after the decoder's (model.layers.80.*)
              "num_nextn_predict_layers": 1}
    return dict(_common(hf), qkv_bias=bias, o_bias=bias, head_qk_norm=True,
                intermediate_size=_get(hf, "intermediate_size"),
                moe_layers=_mlp_layer_types(hf, ["dense"] + ["sparse"] * (n - 1)),
                **_sigmoid_router(router, _get(hf, "num_experts")))


def _flint(hf: dict) -> dict:
    """Flint: Qwen3's attention (per-head q/k norm) with sinks, sliding and full layers by layer_types (default: full
    at layers 0 and 1, every fourth from 1 and the last), the full ones rope-free; a sigmoid router without bias
    (renormalised by norm_topk_prob), an ungated shared expert; Qwen's MoE layers (decoder_sparse_step,
    mlp_only_layers)."""
    hf = {"head_dim": 128, "max_position_embeddings": 262144, "sliding_window": 513, "num_experts": 256,
          "num_experts_per_tok": 6, "moe_intermediate_size": 512, "shared_expert_intermediate_size": 1024,
          "norm_topk_prob": True, "mlp_only_layers": [0, 1], **hf}  # FlintConfig's defaults
    n, experts, bias = _get(hf, "num_hidden_layers"), _get(hf, "num_experts"), bool(_get(hf, "attention_bias", False))
    types = hf.get("layer_types") or ["full_attention" if i < 2 or i % 4 == 1 or i == n - 1 else "sliding_attention"
                                      for i in range(n)]
    return dict(_common(hf), qkv_bias=bias, o_bias=bias, head_qk_norm=True, attention_sinks=True,
                layer_types=tuple(types), sliding_window=_get(hf, "sliding_window"),
                rope_layers=tuple(t == "sliding_attention" for t in types),
                intermediate_size=_get(hf, "intermediate_size"), moe_layers=_qwen_sparse_layers(hf, experts),
                num_experts=experts, num_experts_per_tok=_get(hf, "num_experts_per_tok"),
                moe_intermediate_size=_get(hf, "moe_intermediate_size"),
                norm_topk_prob=bool(_get(hf, "norm_topk_prob")), scoring_func="sigmoid",
                shared_expert_intermediate_size=_get(hf, "shared_expert_intermediate_size"))


def _aria_text(hf: dict) -> dict:
    """Aria's text model: Llama's attention and rope, every layer MoE (experts of intermediate_size, the top-k
    logits softmaxed) with moe_num_shared_experts shared experts beside them."""
    hf = {"intermediate_size": 4096, "moe_num_experts": 8, "moe_topk": 2, "moe_num_shared_experts": 2,
          **hf}  # AriaTextConfig's defaults
    if _get(hf, "mlp_bias", False):
        raise ValueError("config.json: mlp_bias=True is not supported for aria_text (biased shared experts)")
    if _get(hf, "hidden_act", "silu") not in ("silu", "swish"):
        raise ValueError(f"config.json: hidden_act={hf['hidden_act']!r} is not supported for aria_text: its routed "
                         "experts are SiLU whatever hidden_act says, moejax runs one activation; supported: 'silu'")
    bias, size = bool(_get(hf, "attention_bias", False)), _get(hf, "intermediate_size")
    return dict(_common(hf), qkv_bias=bias, o_bias=bias, moe_layers=(True,) * _get(hf, "num_hidden_layers"),
                num_experts=_get(hf, "moe_num_experts"), num_experts_per_tok=_get(hf, "moe_topk"),
                moe_intermediate_size=size, norm_topk_prob=True,  # softmax of the top-k logits
                shared_expert_intermediate_size=size * _get(hf, "moe_num_shared_experts"))


def _dbrx(hf: dict) -> dict:
    """DBRX: LayerNorms without bias; one q|k|v projection clipped to attn_config.clip_qkv; every layer MoE, a
    softmax router whose top-k weights are divided by their L1 norm (ffn_config.moe_normalize_expert_weights 1)
    or kept as they are (null)."""
    attn, ffn = hf.get("attn_config") or {}, hf.get("ffn_config") or {}
    norm_p = ffn.get("moe_normalize_expert_weights", 1.0)
    if norm_p not in (None, 1):
        raise ValueError(f"config.json: ffn_config.moe_normalize_expert_weights={norm_p!r} is not supported for dbrx "
                         "(top-k weights divided by another norm than their sum); supported: 1 or null")
    theta = attn.get("rope_theta")
    if not hf.get("rope_parameters") and not hf.get("rope_scaling") and theta not in (None, 10000.0):
        raise ValueError(f"config.json: attn_config.rope_theta={theta!r} without rope_parameters: transformers 5 "
                         "ignores it (its rope computes with theta 10000) where DBRX was trained with it; add "
                         f'"rope_parameters": {{"rope_type": "default", "rope_theta": {theta}}} to say which')
    if _get(hf, "tie_word_embeddings", False):
        raise ValueError("config.json: tie_word_embeddings=True is not supported for dbrx (transformers refuses it)")
    hf = {"d_model": 2048, "n_heads": 16, "n_layers": 24, "max_seq_len": 2048, **hf}  # DbrxConfig's defaults
    hf = _aliased(hf, {"d_model": "hidden_size", "n_heads": "num_attention_heads", "n_layers": "num_hidden_layers",
                       "max_seq_len": "max_position_embeddings"})
    hf.update(num_key_value_heads=attn.get("kv_n_heads", 1), rms_norm_eps=1e-5,  # torch.nn.LayerNorm's eps
              hidden_act=(ffn.get("ffn_act_fn") or {}).get("name", "silu"))
    return dict(_common(hf), norm_type="unbiased_layer_norm", clip_qkv=attn.get("clip_qkv"),
                moe_layers=(True,) * _get(hf, "num_hidden_layers"), num_experts=ffn.get("moe_num_experts", 4),
                num_experts_per_tok=ffn.get("moe_top_k", 1), moe_intermediate_size=ffn.get("ffn_hidden_size", 3584),
                norm_topk_prob=norm_p is not None)


def _minimax_m2(hf: dict) -> dict:
    """MiniMax-M2: q/k RMSNorm over the whole projection (as OLMoE), partial rotary, every layer MoE with a
    sigmoid router whose choice adds e_score_correction_bias (one group), weights renormalised."""
    hf = {"rope_theta": 5000000.0, "head_dim": 128, **hf}  # MiniMaxM2Config's defaults
    if _get(hf, "qk_norm_type", "per_layer") != "per_layer":
        raise ValueError(f"config.json: qk_norm_type={hf['qk_norm_type']!r} is not supported for minimax_m2; "
                         "supported: 'per_layer'")
    common = _common(hf)
    factor = (hf.get("rope_parameters") or {}).get("partial_rotary_factor")
    rotary_dim = int(common["head_dim"] * factor) if factor is not None else _get(hf, "rotary_dim", common["head_dim"])
    experts = _get(hf, "num_local_experts") if hf.get("num_local_experts") is not None else _get(hf, "num_experts")
    return dict(common, qk_norm=True, rotary_dim=rotary_dim, intermediate_size=_get(hf, "intermediate_size"),
                moe_layers=(True,) * _get(hf, "num_hidden_layers"),
                **_sigmoid_router({**hf, "moe_intermediate_size": _get(hf, "intermediate_size"), "n_shared_experts": 0,
                                   "norm_topk_prob": True, "n_group": 1, "topk_group": 1, "routed_scaling_factor": 1.0},
                                  experts))


def _gpt_oss(hf: dict) -> dict:
    """GPT-OSS: a biased router whose top-k logits are softmaxed (the all-expert softmax renormalised over the
    top-k), biased experts with the clamped SwiGLU, attention sinks, sliding and full layers by layer_types."""
    hf = {"rope_theta": 150000.0, "head_dim": 64, "sliding_window": 128, "attention_bias": True, "rms_norm_eps": 1e-5,
          "max_position_embeddings": 131072, "num_experts_per_tok": 4, **hf}  # GptOssConfig's defaults
    if not hf.get("rope_parameters") and not hf.get("rope_scaling"):  # GptOssConfig's default rope
        hf["rope_scaling"] = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                              "truncate": False, "original_max_position_embeddings": 4096}
    n = _get(hf, "num_hidden_layers")
    types = hf.get("layer_types") or ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(n)]
    experts = _get(hf, "num_local_experts") if hf.get("num_local_experts") is not None else _get(hf, "num_experts")
    bias = bool(_get(hf, "attention_bias"))
    return dict(_common(hf), qkv_bias=bias, o_bias=bias, sliding_window=hf.get("sliding_window"),
                layer_types=tuple(types), attention_sinks=True, intermediate_size=_get(hf, "intermediate_size"),
                moe_layers=(True,) * n, num_experts=experts, num_experts_per_tok=_get(hf, "num_experts_per_tok"),
                moe_intermediate_size=_get(hf, "intermediate_size"), norm_topk_prob=True, router_bias=True,
                moe_bias=True, swiglu_limit=float(_get(hf, "swiglu_limit", 7.0)),
                swiglu_alpha=float(_get(hf, "swiglu_alpha", 1.702)))


def _llama4_text(hf: dict) -> dict:
    """Llama 4's text model: top-1 sigmoid router scaling the expert's input, a shared expert, MoE layers every
    interleave_moe_layer_step-th (dense ones of intermediate_size_mlp), rope-free layers with temperature tuning,
    chunked attention on the rope layers, a weightless q/k norm after rope."""
    hf = {"rope_theta": 500000.0, "head_dim": 128, "rms_norm_eps": 1e-5, "max_position_embeddings": 131072,
          "num_local_experts": 16, "num_experts_per_tok": 1, "intermediate_size": 8192, "intermediate_size_mlp": 16384,
          "use_qk_norm": True, "attention_chunk_size": 8192, "attn_temperature_tuning": True, "floor_scale": 8192,
          "attn_scale": 0.1, "no_rope_layer_interval": 4, "interleave_moe_layer_step": 1, **hf}  # Llama4TextConfig's
    n = _get(hf, "num_hidden_layers")
    step = _get(hf, "interleave_moe_layer_step")
    moe = hf.get("moe_layers") if hf.get("moe_layers") is not None else range(step - 1, n, step)
    rope = hf.get("no_rope_layers") or [int((i + 1) % _get(hf, "no_rope_layer_interval") != 0) for i in range(n)]
    chunk = hf.get("attention_chunk_size")
    types = hf.get("layer_types") or ["chunked_attention" if r and chunk is not None else "full_attention" for r in rope]
    if len(rope) != n:
        raise ValueError(f"config.json: no_rope_layers={rope!r} needs one flag per layer ({n})")
    common = _common(hf)
    common["rope"] = _rope(hf, interleaved=True)  # Llama 4 rotates (x0, x1), (x2, x3), ... as complex numbers
    bias = bool(_get(hf, "attention_bias", False))
    size = _get(hf, "intermediate_size")
    return dict(common, qkv_bias=bias, o_bias=bias, layer_types=tuple(types), attention_chunk_size=chunk,
                rope_layers=tuple(bool(r) for r in rope), qk_l2_norm=bool(_get(hf, "use_qk_norm")),
                attn_temperature_tuning=bool(_get(hf, "attn_temperature_tuning")),
                floor_scale=_get(hf, "floor_scale"), attn_scale=float(_get(hf, "attn_scale")),
                intermediate_size=_get(hf, "intermediate_size_mlp"), moe_layers=tuple(i in set(moe) for i in range(n)),
                num_experts=_get(hf, "num_local_experts"), num_experts_per_tok=_get(hf, "num_experts_per_tok"),
                moe_intermediate_size=size, scoring_func="sigmoid", moe_scales_input=True,
                shared_expert_intermediate_size=size)


def _phimoe(hf: dict) -> dict:
    """Phi-3.5-MoE: sparsemixer top-2 routing, LayerNorm with bias (eps rms_norm_eps), an LM-head bias."""
    hf = {"rope_theta": 1000000.0, "rms_norm_eps": 1e-5, "max_position_embeddings": 131072, "num_local_experts": 16,
          "num_experts_per_tok": 2, "router_jitter_noise": 0.01, **hf}  # PhimoeConfig's defaults
    n = _get(hf, "num_hidden_layers")
    bias = bool(_get(hf, "attention_bias", False))
    common = _common(hf)
    if common["rope"]["kind"] == "su":  # longrope's earlier name
        common["rope"]["kind"] = "longrope"
    if common["rope"]["kind"] == "longrope" and common["rope"]["short_mscale"] is None:
        raise ValueError("config.json: rope_scaling.short_mscale is required for phimoe's longrope")
    return dict(common, qkv_bias=bias, o_bias=bias, sliding_window=hf.get("sliding_window"),
                norm_type="layer_norm", lm_head_bias=bool(_get(hf, "lm_head_bias", False)),
                intermediate_size=_get(hf, "intermediate_size"), moe_layers=(True,) * n,
                num_experts=_get(hf, "num_local_experts"), num_experts_per_tok=_get(hf, "num_experts_per_tok"),
                moe_intermediate_size=_get(hf, "intermediate_size"), topk_method="sparsemixer",
                router_jitter_eps=float(_get(hf, "router_jitter_noise")))


READERS: dict[str, Callable[[dict], dict]] = {
    "mixtral": _mixtral, "olmoe": _olmoe, "qwen2_moe": _qwen2_moe, "deepseek_v2": _deepseek_v2,
    "qwen3_moe": _qwen3_moe, "deepseek_v3": _deepseek_v3, "glm4_moe": _glm4_moe, "granitemoe": _granitemoe,
    "granitemoeshared": _granitemoe, "ernie4_5_moe": _ernie4_5_moe, "dots1": _dots1,
    "minimax_m2": _minimax_m2, "gpt_oss": _gpt_oss, "llama4_text": _llama4_text, "phimoe": _phimoe,
    "kimi_k2": _deepseek_v3, "exaone_moe": _exaone_moe, "solar_open": _solar_open,
    "glm4_moe_lite": _glm4_moe_lite, "sarvam_moe": _sarvam_moe, "sarvam_mla": _sarvam_mla,
    "dbrx": _dbrx, "granitemoe_swa": _granitemoe_swa, "hy_v3": _hy_v3,
    "flint": _flint, "aria_text": _aria_text}
