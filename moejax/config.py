"""Model configuration, read from a Hugging Face `config.json`.

Every architectural detail the model needs is a field of `ModelConfig`, filled from the checkpoint's
config by the family's reader (moejax.family_readers): nothing is assumed from the family name alone, so variants
within a family (numbers of experts, k, sizes, flags) work because they are read.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from moejax.family_defaults import with_family_defaults
from moejax.families import MODEL_TYPE_ALIASES, READERS, SUPPORTED_ARCHITECTURES, reader
from moejax.family_writers import WRITERS, rope_parameters
from moejax.quantization import read_format


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary position embedding as the checkpoint's config says (HF `rope_parameters` / `rope_scaling`)."""

    theta: float = 10000.0
    kind: str = "default"  # one of moejax.models.rope.ROPE_TYPES
    factor: float = 1.0
    original_max_position: int | None = None  # yarn
    beta_fast: float = 32.0  # yarn
    beta_slow: float = 1.0  # yarn
    mscale: float | None = None  # yarn (DeepSeek)
    mscale_all_dim: float | None = None  # yarn (DeepSeek)
    attention_factor: float | None = None  # yarn: scale of cos/sin; None derives it from factor / mscale
    truncate: bool = True  # yarn
    # longrope (Phi-3.5-MoE), in its short regime: per-frequency divisors and the cos/sin scale for sequences
    # within original_max_position (past it transformers switches to long_factor / long_mscale: refused)
    short_factor: tuple[float, ...] | None = None
    short_mscale: float | None = None
    long_factor: tuple[float, ...] | None = None  # kept for export; never computed with
    long_mscale: float | None = None
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    interleaved: bool = False  # rotate (x0, x1), (x2, x3), ... pairs (DeepSeek) instead of the two halves

    def yarn_mscale(self, mscale: float = 1.0) -> float:
        return 1.0 if self.factor <= 1 else 0.1 * mscale * math.log(self.factor) + 1.0


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A decoder-only MoE transformer. Families differ only in the values of these fields."""

    architecture: str  # one of SUPPORTED_MODEL_TYPES (an alias's family: kimi_k2 builds deepseek_v3)
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope: RopeConfig = RopeConfig()
    max_position_embeddings: int = 4096
    sliding_window: int | None = None  # attend only to the last `sliding_window` positions
    # per layer, its attention's kind, one of ATTENTION_KINDS (GPT-OSS alternates sliding and full, Llama 4 chunked
    # and full); (): "sliding_attention" in every layer where sliding_window is set, else "full_attention"
    layer_types: tuple[str, ...] = ()
    attention_chunk_size: int | None = None  # "chunked_attention": a query sees the keys of its own chunk only
    attention_sinks: bool = False  # GPT-OSS: a learned logit per head joins every softmax's denominator
    rope_layers: tuple[bool, ...] = ()  # per layer, whether it applies rope (Llama 4's no_rope_layers); (): all
    qk_l2_norm: bool = False  # Llama 4: a weightless RMS norm of each head's q and k after rope, on rope layers
    # Llama 4's temperature tuning on its rope-free layers: q *= 1 + attn_scale * log(1 + floor((p + 1) / floor_scale))
    attn_temperature_tuning: bool = False
    floor_scale: int = 8192
    attn_scale: float = 0.1
    # every norm but q/k's, eps rms_norm_eps: "rms_norm", "layer_norm" (with bias: Phi-3.5-MoE) or
    # "unbiased_layer_norm" (DBRX)
    norm_type: str = "rms_norm"
    lm_head_bias: bool = False  # Phi-3.5-MoE
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False  # OLMoE: RMSNorm over the whole q / k projection, before the head split
    head_qk_norm: bool = False  # Qwen3 / GLM-4.5: RMSNorm over each head's head_dim, after the split, before rope
    rotary_dim: int = 0  # rope on the first rotary_dim dims of each head (GLM-4.5's partial rotary); 0: all
    clip_qkv: float | None = None  # OLMoE
    # Multi-head latent attention (DeepSeek-V2); kv_lora_rank > 0 switches it on.
    q_lora_rank: int | None = None
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    # Feed-forward: dense layers use intermediate_size, MoE layers moe_intermediate_size per expert.
    intermediate_size: int = 0
    moe_layers: tuple[bool, ...] = ()  # one flag per layer: is its feed-forward a MoE block?
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    # the routed experts' FFN (moejax.kernels.ExpertWeights): gated act(x @ gate) * (x @ up), or (False) a plain
    # act(x @ up) (NLLB-MoE, Switch); moe_bias: biases on the experts' projections (GPT-OSS, NLLB-MoE)
    moe_gated: bool = True
    moe_bias: bool = False
    # GPT-OSS's clamped SwiGLU (kernels.ClampedSwiGLU) as the experts' activation, with this limit; None: hidden_act
    swiglu_limit: float | None = None
    swiglu_alpha: float = 1.702
    router_bias: bool = False  # GPT-OSS: the router's logits have a bias
    # Llama 4: the chosen expert's input is the token times its router score, its output joins with weight 1
    moe_scales_input: bool = False
    router_jitter_eps: float = 0.01  # sparsemixer (Phi-3.5-MoE): the relative band of logits a choice's softmax spans
    norm_topk_prob: bool = False  # renormalise the top-k weights to sum to 1
    scoring_func: str = "softmax"  # router scores: "softmax" or "sigmoid" (DeepSeek-V3, GLM-4.5, Llama 4)
    # "greedy", "group_limited_greedy" (DeepSeek-V2), "noaux_tc" (DeepSeek-V3: the choice adds a learned
    # e_score_correction_bias to the scores, groups ranked by the sum of their top-2) or "sparsemixer"
    # (Phi-3.5-MoE's top-2 rule in eval mode, see moejax.routing)
    topk_method: str = "greedy"
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    shared_expert_intermediate_size: int = 0  # 0: no shared expert
    shared_expert_gate: bool = False  # Qwen2-MoE: the shared expert's output is scaled by sigmoid(x @ g)
    # Granite's multipliers: the embeddings times embedding_multiplier, each sublayer's output times
    # residual_multiplier as it joins the residual stream, attention_multiplier as the softmax scale (None:
    # 1/sqrt(qk head dim)), the logits divided by logits_scaling
    embedding_multiplier: float = 1.0
    residual_multiplier: float = 1.0
    attention_multiplier: float | None = None
    logits_scaling: float = 1.0
    # multi-token-prediction layers (DeepSeek-V3, GLM-4.5) the checkpoint holds after the decoder's, as
    # model.layers.{num_layers + j}.*: transformers does not run them in a forward, nor does moejax (skipped at load)
    mtp_layers: int = 0
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None

    @property
    def is_mla(self) -> bool:
        return self.kv_lora_rank > 0

    @property
    def attention_scale(self) -> float:
        """Softmax scale: 1/sqrt(qk head dim), times yarn's mscale^2 where DeepSeek's config asks for it;
        Granite's attention_multiplier where the config gives one."""
        if self.attention_multiplier is not None:
            return self.attention_multiplier
        qk_dim = self.qk_nope_head_dim + self.qk_rope_head_dim if self.is_mla else self.head_dim
        scale = qk_dim**-0.5
        if self.rope.kind == "yarn" and self.rope.mscale_all_dim:
            m = self.rope.yarn_mscale(self.rope.mscale_all_dim)
            scale *= m * m
        return scale

    def attention_kind(self, layer: int) -> str:
        """Layer `layer`'s attention, one of ATTENTION_KINDS."""
        if self.layer_types:
            return self.layer_types[layer]
        return "sliding_attention" if self.sliding_window else "full_attention"

    def uses_rope(self, layer: int) -> bool:
        return not self.rope_layers or self.rope_layers[layer]

    @property
    def rope_dim(self) -> int:
        return self.qk_rope_head_dim if self.is_mla else self.rotary_dim or self.head_dim

    def __post_init__(self):
        _check(self.architecture in SUPPORTED_MODEL_TYPES or self.architecture in ENCODER_DECODER_MODEL_TYPES,
               "architecture", self.architecture, f"supported: {sorted(SUPPORTED_MODEL_TYPES)}")
        for name in _INTEGER_FIELDS:
            _check(is_integer(getattr(self, name)), name, getattr(self, name), "must be an integer")
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                     "max_position_embeddings"):
            _check(getattr(self, name) > 0, name, getattr(self, name), "must be positive")
        for name in ("bos_token_id", "pad_token_id"):
            value = getattr(self, name)
            _check(value is None or is_integer(value), name, value, "must be a token id (an integer) or null")
        eos = self.eos_token_id if isinstance(self.eos_token_id, tuple) else (self.eos_token_id,)
        _check(self.eos_token_id is None or all(is_integer(e) for e in eos), "eos_token_id", self.eos_token_id,
               "must be a token id, a list of token ids or null")
        _check(self.num_heads % self.num_kv_heads == 0, "num_key_value_heads", self.num_kv_heads,
               f"must divide num_attention_heads={self.num_heads}")
        _check(len(self.moe_layers) == self.num_layers, "moe_layers", self.moe_layers,
               f"needs one flag per layer ({self.num_layers})")
        if any(self.moe_layers):
            _check(self.num_experts > 0, "num_experts", self.num_experts, "must be positive in a MoE model")
            _check(0 < self.num_experts_per_tok <= self.num_experts, "num_experts_per_tok",
                   self.num_experts_per_tok, f"must be in [1, num_experts={self.num_experts}]")
            _check(self.moe_intermediate_size > 0, "moe_intermediate_size", self.moe_intermediate_size,
                   "must be positive")
        if not all(self.moe_layers):
            _check(self.intermediate_size > 0, "intermediate_size", self.intermediate_size,
                   "must be positive when some layers are dense")
        _check(self.topk_method in TOPK_METHODS, "topk_method", self.topk_method, f"supported: {TOPK_METHODS}")
        _check(self.scoring_func in ("softmax", "sigmoid"), "scoring_func", self.scoring_func,
               "supported: 'softmax', 'sigmoid'")
        _check(0 <= self.rotary_dim <= self.head_dim and self.rotary_dim % 2 == 0, "rotary_dim", self.rotary_dim,
               f"must be even and in [0, head_dim={self.head_dim}]")
        if self.topk_method in ("group_limited_greedy", "noaux_tc") and any(self.moe_layers):
            _check(self.n_group > 0 and self.num_experts % self.n_group == 0, "n_group", self.n_group,
                   f"must divide num_experts={self.num_experts}")
            _check(self.topk_method != "noaux_tc" or self.num_experts // self.n_group >= 2, "n_group", self.n_group,
                   "noaux_tc ranks groups by the sum of their top-2 scores: each group needs at least 2 experts")
            _check(0 < self.topk_group <= self.n_group, "topk_group", self.topk_group,
                   f"must be in [1, n_group={self.n_group}]")
            _check(self.topk_group * (self.num_experts // self.n_group) >= self.num_experts_per_tok,
                   "topk_group", self.topk_group, "the chosen groups hold fewer experts than num_experts_per_tok")
        _check(self.hidden_act in ACTIVATIONS, "hidden_act", self.hidden_act, f"supported: {sorted(ACTIVATIONS)}")
        _check(self.swiglu_limit is None or (self.moe_gated and self.swiglu_limit > 0), "swiglu_limit",
               self.swiglu_limit, "must be a positive number, for gated experts (moe_gated)")
        for name in ("layer_types", "rope_layers"):
            _check(len(getattr(self, name)) in (0, self.num_layers), name, getattr(self, name),
                   f"needs one entry per layer ({self.num_layers}) or none")
        for kind in set(self.layer_types):
            _check(kind in ATTENTION_KINDS, "layer_types", self.layer_types, f"supported kinds: {ATTENTION_KINDS}")
        kinds = {self.attention_kind(i) for i in range(self.num_layers)}
        _check("sliding_attention" not in kinds or (self.sliding_window or 0) > 0, "sliding_window",
               self.sliding_window, "sliding_attention layers need a positive sliding_window")
        _check("chunked_attention" not in kinds or (self.attention_chunk_size or 0) > 0, "attention_chunk_size",
               self.attention_chunk_size, "chunked_attention layers need a positive attention_chunk_size")
        _check(self.norm_type in NORM_TYPES, "norm_type", self.norm_type, f"supported: {NORM_TYPES}")
        if self.moe_scales_input and any(self.moe_layers):  # x * score before the expert is exact for one expert
            _check(self.num_experts_per_tok == 1, "num_experts_per_tok", self.num_experts_per_tok,
                   "a router that scales the expert's input (Llama 4) is computed for top-1 routing only")
        if self.topk_method == "sparsemixer" and any(self.moe_layers):
            _check(self.num_experts_per_tok == 2 and self.num_experts >= 2, "num_experts_per_tok",
                   self.num_experts_per_tok, "sparsemixer routes every token to exactly 2 experts")
        _check(self.rope.kind in ROPE_TYPES, "rope_type", self.rope.kind, f"supported: {ROPE_TYPES}")
        _check(self.rope.kind not in ("llama3", "longrope") or bool(self.rope.original_max_position),
               "original_max_position_embeddings", self.rope.original_max_position,
               f"{self.rope.kind} rope needs the original context length")
        _check(self.rope.kind != "longrope" or len(self.rope.short_factor or ()) * 2 == self.rope_dim, "short_factor",
               self.rope.short_factor, f"longrope needs one factor per rotary frequency ({self.rope_dim // 2})")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        d = dict(d)
        rope = dict(d["rope"])
        for name in ("short_factor", "long_factor"):
            if rope.get(name) is not None:
                rope[name] = tuple(rope[name])
        d["rope"] = RopeConfig(**rope)
        for name in ("moe_layers", "layer_types", "rope_layers"):
            d[name] = tuple(d.get(name, ()))
        if isinstance(d.get("eos_token_id"), list):
            d["eos_token_id"] = tuple(d["eos_token_id"])
        return cls(**d)


_INTEGER_FIELDS = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                   "max_position_embeddings", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
                   "intermediate_size", "num_experts", "num_experts_per_tok", "moe_intermediate_size", "n_group",
                   "topk_group", "shared_expert_intermediate_size", "rotary_dim", "mtp_layers", "floor_scale")
TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc", "sparsemixer")
ROPE_TYPES = ("default", "linear", "llama3", "yarn", "longrope")
ATTENTION_KINDS = ("full_attention", "sliding_attention", "chunked_attention")
NORM_TYPES = ("rms_norm", "layer_norm", "unbiased_layer_norm")

# Activation names as HF configs spell them -> the name our expert kernel takes.
ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu_exact", "gelu_new": "gelu",
               "gelu_pytorch_tanh": "gelu", "relu": "relu"}


def _check(ok: bool, name: str, value: Any, why: str) -> None:
    if not ok:
        raise ValueError(f"config: {name}={value!r} is invalid: {why}")


def is_integer(value: Any) -> bool:
    """A Python or numpy integer, not a bool (True is an int to Python) nor a float such as 2.0: the test
    every integer argument of moejax's entry points makes before naming the bad value."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


# ---------------------------------------------------------------------------------------------------------
# Reading Hugging Face config.json: the types of its keys here, one reader per family in moejax.family_readers.
# The types of the config.json keys the readers use (a string "4" or a "false" would compute silently wrong:
# bool("false") is True). Keys that may be null are checked only when set.
_JSON_INTEGERS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                  "head_dim", "max_position_embeddings", "intermediate_size", "num_local_experts", "num_experts",
                  "num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size",
                  "decoder_sparse_step", "n_routed_experts", "first_k_dense_replace", "moe_layer_freq",
                  "kv_lora_rank", "q_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "n_group",
                  "topk_group", "n_shared_experts", "sliding_window", "bos_token_id", "pad_token_id",
                  "num_nextn_predict_layers", "shared_intermediate_size", "moe_num_experts", "moe_k",
                  "moe_layer_start_index", "moe_layer_end_index", "moe_layer_interval", "moe_num_shared_experts",
                  "max_window_layers", "rotary_dim", "intermediate_size_mlp", "interleave_moe_layer_step",
                  "no_rope_layer_interval", "attention_chunk_size", "floor_scale", "num_shared_experts",
                  "d_model", "n_heads", "n_layers", "max_seq_len", "kv_n_heads", "ffn_hidden_size", "moe_top_k",
                  "moe_topk", "num_mtp_layers", "decoder_start_token_id")
_JSON_NUMBERS = ("rms_norm_eps", "rope_theta", "routed_scaling_factor", "clip_qkv", "partial_rotary_factor",
                 "embedding_multiplier", "residual_multiplier", "attention_multiplier", "logits_scaling", "moe_norm_min",
                 "swiglu_limit", "swiglu_alpha", "attn_scale", "router_jitter_noise", "moe_normalize_expert_weights",
                 "router_scaling_factor")
# ... and of these, which readers divide by or step over, positive too
_JSON_POSITIVE = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "decoder_sparse_step",
                  "interleave_moe_layer_step", "moe_layer_freq", "moe_layer_interval", "no_rope_layer_interval",
                  "d_model", "n_heads", "n_layers")
# the numbers of a rope_parameters / rope_scaling object
_JSON_ROPE_NUMBERS = ("rope_theta", "factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "attention_factor",
                      "low_freq_factor", "high_freq_factor", "short_mscale", "long_mscale", "partial_rotary_factor")
_JSON_STRINGS = ("hidden_act", "model_type")
_JSON_BOOLS = ("tie_word_embeddings", "norm_topk_prob", "attention_bias", "qkv_bias", "mlp_bias",
               "use_sliding_window", "use_qk_norm", "rope_interleave", "use_bias", "attn_temperature_tuning",
               "lm_head_bias", "use_qkv_bias")


def _check_json_types(hf: dict, within: str = "", file: str = "config.json") -> None:
    def bad(key, what):
        raise ValueError(f"{file}: {within}{key}={hf[key]!r} is invalid: must be {what}")

    for key in _JSON_INTEGERS:
        if hf.get(key) is not None and not is_integer(hf[key]):
            bad(key, "an integer")
    for key in _JSON_POSITIVE:
        if hf.get(key) is not None and hf[key] <= 0:
            bad(key, "a positive integer")
    for key in _JSON_STRINGS:
        if hf.get(key) is not None and not isinstance(hf[key], str):
            bad(key, "a string")
    for key in ("rope_parameters", "rope_scaling"):
        if hf.get(key) is not None:
            if not isinstance(hf[key], dict):
                bad(key, "an object (or null)")
            for name, value in hf[key].items():
                if name in _JSON_ROPE_NUMBERS and value is not None and (
                        isinstance(value, bool) or not isinstance(value, (int, float))):
                    raise ValueError(f"{file}: {within}{key}.{name}={value!r} is invalid: must be a number")
            if hf[key].get("original_max_position_embeddings") is not None and not is_integer(
                    hf[key]["original_max_position_embeddings"]):
                raise ValueError(f"{file}: {within}{key}.original_max_position_embeddings="
                                 f"{hf[key]['original_max_position_embeddings']!r} is invalid: must be an integer")
    for key in _JSON_NUMBERS:
        if hf.get(key) is not None and (isinstance(hf[key], bool) or not isinstance(hf[key], (int, float))):
            bad(key, "a number")
    for key in _JSON_BOOLS:
        if hf.get(key) is not None and not isinstance(hf[key], bool):
            bad(key, "true or false")
    eos = hf.get("eos_token_id")
    if eos is not None and not (is_integer(eos) or isinstance(eos, list) and all(is_integer(e) for e in eos)):
        bad("eos_token_id", "a token id or a list of token ids")
    for key, (element_ok, what) in _JSON_LISTS.items():
        if hf.get(key) is not None and not (isinstance(hf[key], list) and all(map(element_ok, hf[key]))):
            bad(key, what)
    for key in _JSON_SUB_CONFIGS:  # their keys checked as the top level's
        if hf.get(key) is not None:
            if not isinstance(hf[key], dict):
                bad(key, "an object")
            _check_json_types(hf[key], f"{within}{key}.", file)


GENERATION_TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")


def generation_token_ids(generation: dict | None, keys=GENERATION_TOKEN_IDS) -> dict:
    """The token ids of a generation_config.json that win over config.json's (transformers generates with
    them), checked: a bad one fails naming generation_config.json."""
    ids = {k: generation[k] for k in keys if k in (generation or {})}
    _check_json_types(ids, file="generation_config.json")
    return ids


_JSON_LISTS = {"mlp_only_layers": (is_integer, "a list of layer indices"),
               "moe_layers": (is_integer, "a list of layer indices"),  # Llama 4
               "no_rope_layers": (lambda v: v in (0, 1) and not isinstance(v, float), "a list of 0 / 1 flags"),
               "layer_types": (lambda v: isinstance(v, str), "a list of attention kinds (strings)"),
               "mlp_layer_types": (lambda v: isinstance(v, str), "a list of 'dense' / 'sparse' (strings)"),
               "layer_rope_theta": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
                                    "a list of numbers (0: no rope)")}
_JSON_SUB_CONFIGS = ("attn_config", "ffn_config")  # DBRX


SUPPORTED_MODEL_TYPES = frozenset(READERS)
# moejax.seq2seq's families: a ModelConfig there describes their MoE blocks (Seq2SeqConfig.moe_config)
ENCODER_DECODER_MODEL_TYPES = ("nllb-moe", "switch_transformers")


def from_hf_config(hf: dict, generation: dict | None = None) -> ModelConfig:
    """ModelConfig from the dict of a Hugging Face config.json; other model types fail with the supported list
    (and a refused one with why: moejax.families.REFUSED).
    `generation`: the checkpoint's generation_config.json, whose bos / eos / pad token ids win over
    config.json's where it names them (transformers generates with them)."""
    if not isinstance(hf, dict):
        raise ValueError(f"config.json must hold a JSON object; got {type(hf).__name__}")
    read_format(hf.get("quantization_config"))  # a format moejax dequantizes at load, else refused by name
    _check_json_types(hf)
    hf = {**hf, **generation_token_ids(generation)}
    model_type = hf.get("model_type")
    if model_type in ENCODER_DECODER_MODEL_TYPES:
        raise ValueError(f"config.json: model_type {model_type!r} is an encoder-decoder model: load it with "
                         "moejax.seq2seq.load_pretrained")
    read = reader(model_type)
    hf = with_family_defaults(model_type, hf)
    for arch in hf.get("architectures") or []:
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ValueError(f"config.json: unsupported architecture {arch!r}; supported architectures: "
                             f"{sorted(SUPPORTED_ARCHITECTURES)}")
    fields = read(hf)
    architecture = MODEL_TYPE_ALIASES.get(model_type, model_type)
    return ModelConfig(architecture=architecture, **dict(fields, rope=RopeConfig(**fields["rope"])))


# ---------------------------------------------------------------------------------------------------------
# Writing config.json (export): the inverse of the readers, for the families a moejax model can be written as.


def to_hf_config(config: ModelConfig, dtype="float32") -> dict:
    """The Hugging Face config.json dict of `config` (its family's writer in moejax.family_writers plus the
    shared keys). It is read back with the family's reader: a field the family cannot express (it would read
    back otherwise) fails naming it, as does a family with no writer."""
    c = config
    if c.architecture not in WRITERS:
        raise ValueError(f"export to {c.architecture} is not supported; supported: {sorted(WRITERS)}")
    hf = {
        "model_type": c.architecture,
        "architectures": [next(a for a, t in SUPPORTED_ARCHITECTURES.items() if t == c.architecture)],
        "vocab_size": c.vocab_size, "hidden_size": c.hidden_size, "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads, "num_key_value_heads": c.num_kv_heads, "head_dim": c.head_dim,
        "rms_norm_eps": c.rms_norm_eps, "rope_parameters": rope_parameters(c),
        "max_position_embeddings": c.max_position_embeddings, "hidden_act": c.hidden_act,
        "tie_word_embeddings": c.tie_word_embeddings, "bos_token_id": c.bos_token_id,
        "eos_token_id": list(c.eos_token_id) if isinstance(c.eos_token_id, tuple) else c.eos_token_id,
        "pad_token_id": c.pad_token_id, "torch_dtype": str(dtype), **WRITERS[c.architecture](c),
    }
    try:
        back = from_hf_config(hf)
    except ValueError as e:
        raise ValueError(f"cannot export as {c.architecture}: {e}") from None
    ours, theirs = _computed(c), _computed(back)
    for field in dataclasses.fields(ModelConfig):
        if ours[field.name] != theirs[field.name]:
            raise ValueError(f"cannot export as {c.architecture}: {field.name}={getattr(c, field.name)!r} is not "
                             f"expressible there (its config.json reads back {getattr(back, field.name)!r})")
    return hf


def _computed(c: ModelConfig) -> dict[str, Any]:
    """c's fields as what they compute: per-layer kinds and rope spelled out, the softmax scale, and the
    dense FFN size only where a layer is dense."""
    fields = dataclasses.asdict(c)
    fields.update(layer_types=tuple(c.attention_kind(i) for i in range(c.num_layers)),
                  rope_layers=tuple(c.uses_rope(i) for i in range(c.num_layers)), attention_multiplier=c.attention_scale,
                  rotary_dim=c.rope_dim, intermediate_size=0 if all(c.moe_layers) else c.intermediate_size)
    return fields
