"""The configuration of an encoder-decoder MoE model, read from a Hugging Face config.json: one reader per
family (NLLB-MoE, Switch Transformers).

Every detail the model computes with is a field, read from the checkpoint's config (the families'
transformers defaults where a key is absent); a setting moejax does not compute is refused naming the key.
Dropout of every kind is a training device and is ignored, except NLLB's expert output masking, whose
inference form is a scale (`expert_output_scale`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

from moejax.config import (ACTIVATIONS, ENCODER_DECODER_MODEL_TYPES, GENERATION_TOKEN_IDS, ModelConfig,
                           generation_token_ids, is_integer)

NLLB_MOE, SWITCH = ENCODER_DECODER_MODEL_TYPES  # moejax.config lets a ModelConfig describe their MoE blocks
_ARCHITECTURES = {NLLB_MOE: ("NllbMoeForConditionalGeneration",), SWITCH: ("SwitchTransformersForConditionalGeneration",)}
NORMS = ("layer_norm", "rms_norm")
POSITIONS = ("sinusoidal", "relative")
_LAYER_NORM_EPS = 1e-5  # torch.nn.LayerNorm's default: NLLB-MoE's layer norms take no eps from the config


@dataclasses.dataclass(frozen=True)
class Seq2SeqConfig:
    """An encoder-decoder MoE transformer (pre-norm). The two families differ only in these values."""

    architecture: str  # NLLB_MOE or SWITCH
    vocab_size: int
    hidden_size: int
    encoder_layers: int
    decoder_layers: int
    encoder_heads: int
    decoder_heads: int
    head_dim: int
    encoder_ffn_dim: int  # the dense FFNs' and the experts' hidden width, per stack
    decoder_ffn_dim: int
    encoder_moe_layers: tuple[bool, ...]  # one flag per layer: is its feed-forward a MoE block?
    decoder_moe_layers: tuple[bool, ...]
    num_experts: int
    num_experts_per_tok: int  # 2 (NLLB's top-2 router) or 1 (Switch's top-1)
    hidden_act: str = "relu"
    norm: str = "layer_norm"  # "layer_norm" (mean and bias: NLLB) or "rms_norm" (T5's: Switch)
    norm_eps: float = _LAYER_NORM_EPS
    bias: bool = True  # biases on the attention projections and every FFN, experts included (NLLB)
    router_bias: bool = False
    scaled_attention: bool = True  # softmax(q k / sqrt(head_dim)); T5 folds the scale into its weights (False)
    positions: str = "sinusoidal"  # NLLB's sinusoidal embeddings, or T5's relative position buckets (Switch)
    max_position_embeddings: int | None = None  # sinusoidal: the longest sequence the checkpoint was built for
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    scale_embedding: bool = False  # token embeddings times sqrt(hidden_size) (NLLB)
    tie_word_embeddings: bool = True
    scale_tied_logits: bool = False  # T5: a tied head sees the final hidden times hidden_size ** -0.5
    # The family's own expert capacity at inference (transformers in eval mode; see moejax.seq2seq.moe).
    capacity_fraction: float | None = None  # NLLB: moe_eval_capacity_token_fraction (None: not positive)
    expert_capacity: int | None = None  # NLLB without a positive fraction; Switch: per sequence
    normalize_router_prob_before_dropping: bool = False  # NLLB: top-2 weights normalised before the drop
    batch_prioritized_routing: bool = False  # NLLB: capacity slots go to the most confident tokens first
    expert_output_scale: float = 1.0  # NLLB: 1 - moe_token_dropout (expert output masking at inference)
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    decoder_start_token_id: int | None = None

    @property
    def num_layers(self) -> int:
        """Encoder and decoder layers: the model numbers its layers encoder first, then decoder."""
        return self.encoder_layers + self.decoder_layers

    @property
    def moe_layers(self) -> tuple[bool, ...]:
        return self.encoder_moe_layers + self.decoder_moe_layers

    @property
    def attention_scale(self) -> float:
        return self.head_dim**-0.5 if self.scaled_attention else 1.0

    @functools.cache
    def moe_config(self, stack: str) -> ModelConfig:
        """What a MoE block of `stack` ("encoder" or "decoder") computes with, as the ModelConfig that
        moejax.models.moe.MoEBlock and the runtime read: non-gated experts of the stack's FFN width, with
        biases where the family has them, the router's bias; the layers numbered encoder first (MoE-layer
        ids). norm_topk_prob: NLLB's router normalises its top-2 weights (what a moejax policy's
        renormalize="family" follows); Switch's weight is the top-1 probability."""
        ffn = self.encoder_ffn_dim if stack == "encoder" else self.decoder_ffn_dim
        return ModelConfig(
            architecture=self.architecture, vocab_size=self.vocab_size, hidden_size=self.hidden_size,
            num_layers=self.num_layers, num_heads=self.decoder_heads, num_kv_heads=self.decoder_heads,
            head_dim=self.head_dim, max_position_embeddings=2**31 - 1,  # positions are the family's (check_lengths)
            hidden_act=self.hidden_act, intermediate_size=ffn, moe_layers=self.moe_layers,
            num_experts=self.num_experts, num_experts_per_tok=self.num_experts_per_tok, moe_intermediate_size=ffn,
            moe_gated=False, moe_bias=self.bias, router_bias=self.router_bias, norm_topk_prob=self.normalizes_top_k,
            tie_word_embeddings=self.tie_word_embeddings, bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id, pad_token_id=self.pad_token_id)

    @property
    def normalizes_top_k(self) -> bool:
        """The router's weights are the top-k probabilities renormalised to sum to 1 (NLLB's top-2), or the
        top-1 probability as it is (Switch)."""
        return self.num_experts_per_tok > 1

    def __post_init__(self):
        _check(self.architecture in _ARCHITECTURES, "model_type", self.architecture, f"supported: {sorted(_ARCHITECTURES)}")
        for name in ("vocab_size", "hidden_size", "encoder_layers", "decoder_layers", "encoder_heads", "decoder_heads",
                     "head_dim", "encoder_ffn_dim", "decoder_ffn_dim", "relative_attention_num_buckets",
                     "relative_attention_max_distance"):
            value = getattr(self, name)
            _check(is_integer(value) and value > 0, name, value, "must be a positive integer")
        _check(len(self.encoder_moe_layers) == self.encoder_layers, "encoder_moe_layers", self.encoder_moe_layers,
               f"needs one flag per encoder layer ({self.encoder_layers})")
        _check(len(self.decoder_moe_layers) == self.decoder_layers, "decoder_moe_layers", self.decoder_moe_layers,
               f"needs one flag per decoder layer ({self.decoder_layers})")
        if any(self.moe_layers):
            _check(is_integer(self.num_experts) and self.num_experts > 0, "num_experts", self.num_experts,
                   "must be a positive integer in a MoE model")
            _check(0 < self.num_experts_per_tok <= self.num_experts, "num_experts_per_tok", self.num_experts_per_tok,
                   f"must be in [1, num_experts={self.num_experts}]")
        _check(self.hidden_act in ACTIVATIONS, "hidden_act", self.hidden_act, f"supported: {sorted(ACTIVATIONS)}")
        _check(self.norm in NORMS, "norm", self.norm, f"supported: {NORMS}")
        _check(self.positions in POSITIONS, "positions", self.positions, f"supported: {POSITIONS}")
        if self.positions == "sinusoidal":
            _check(self.hidden_size >= 4, "hidden_size", self.hidden_size, "sinusoidal positions need at least 4")
            _check(is_integer(self.max_position_embeddings) and self.max_position_embeddings > 0,
                   "max_position_embeddings", self.max_position_embeddings, "must be a positive integer")
            _check(self.pad_token_id is not None, "pad_token_id", None, "sinusoidal positions count from it")
        for name in ("pad_token_id", "bos_token_id", "decoder_start_token_id"):
            value = getattr(self, name)
            _check(value is None or is_integer(value), name, value, "must be a token id (an integer) or null")
        start = self.decoder_start_token_id
        _check(start is None or 0 <= start < self.vocab_size, "decoder_start_token_id", start,
               f"is outside the vocabulary [0, {self.vocab_size})")
        _check(self.capacity_fraction is None or self.capacity_fraction > 0, "capacity_fraction",
               self.capacity_fraction, "must be positive (or None)")
        _check(self.expert_capacity is None or (is_integer(self.expert_capacity) and self.expert_capacity >= 0),
               "expert_capacity", self.expert_capacity, "must be an integer >= 0 (or None)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Seq2SeqConfig":
        """The inverse of to_dict after a JSON round trip (lists back to tuples)."""
        d = dict(d)
        for name in ("encoder_moe_layers", "decoder_moe_layers"):
            d[name] = tuple(d[name])
        if isinstance(d.get("eos_token_id"), list):
            d["eos_token_id"] = tuple(d["eos_token_id"])
        return cls(**d)


def _check(ok: bool, name: str, value: Any, why: str) -> None:
    if not ok:
        raise ValueError(f"config: {name}={value!r} is invalid: {why}")


# ---------------------------------------------------------------------------------------------------------
# Reading config.json


def from_hf_config(hf: dict, generation: dict | None = None) -> Seq2SeqConfig:
    """Seq2SeqConfig from the dict of a Hugging Face config.json (and generation_config.json, whose token
    ids win where it names them, as transformers generates with them). Encoder-only models and unknown
    families fail naming what they are."""
    if not isinstance(hf, dict):
        raise ValueError(f"config.json must hold a JSON object; got {type(hf).__name__}")
    model_type = hf.get("model_type")
    if model_type not in _READERS:
        raise ValueError(f"config.json: model_type {model_type!r} is not an encoder-decoder MoE family moejax reads; "
                         f"supported: {sorted(_READERS)}")
    for arch in hf.get("architectures") or []:
        if "Encoder" in arch and "Decoder" not in arch:
            raise ValueError(f"config.json: architecture {arch!r} is an encoder-only model: it has no decoder to "
                             "compute logits or generate with (moejax reads the ...ForConditionalGeneration models)")
        if arch not in _ARCHITECTURES[model_type]:
            raise ValueError(f"config.json: unsupported architecture {arch!r}; supported: {_ARCHITECTURES[model_type]}")
    if _get(hf, "is_encoder_decoder", bool, True) is False:
        raise ValueError(f"config.json: is_encoder_decoder=false: a {model_type} model without its decoder "
                         "(encoder-only) has nothing to generate with")
    hf = {**hf, **generation_token_ids(generation, GENERATION_TOKEN_IDS + ("decoder_start_token_id",))}
    return Seq2SeqConfig(architecture=model_type, **_READERS[model_type](hf))


def _get(hf: dict, key: str, kind: type | tuple, default: Any) -> Any:
    """hf[key] checked to be of `kind` (bool is no int and no float), or `default` where absent or null."""
    value = hf.get(key)
    if value is None:
        return default
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) != (bool in kinds) or not isinstance(value, kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise ValueError(f"config.json: {key}={value!r} is invalid: must be {names}")
    return value


def _refuse_unless(hf: dict, key: str, supported, default, why: str) -> None:
    value = hf.get(key, default)
    if value not in supported:
        raise ValueError(f"config.json: {key}={value!r} is not supported: {why}")


def _given(hf: dict, key: str, default: Any) -> Any:
    """hf[key] where the key is there, a JSON null included (null: None, as transformers reads it)."""
    return hf[key] if key in hf else default


def _token_ids(hf: dict, **defaults) -> dict:
    """The special token ids, each the family's default where config.json does not name it."""
    ids = {key: _given(hf, key, defaults.get(key)) for key in
           ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id")}
    eos = ids["eos_token_id"]
    if isinstance(eos, list):
        if not all(is_integer(e) for e in eos):
            raise ValueError(f"config.json: eos_token_id={eos!r} is invalid: must be token ids")
        ids["eos_token_id"] = tuple(eos)
    elif eos is not None and not is_integer(eos):
        raise ValueError(f"config.json: eos_token_id={eos!r} is invalid: must be a token id or a list of them")
    return ids


def _nllb_moe(hf: dict) -> dict:
    """transformers' NllbMoeConfig / modeling_nllb_moe, with its defaults."""
    _refuse_unless(hf, "second_expert_policy", ("all",), "all",
                   "'sampling' and 'random' draw the second expert at random even at inference; moejax supports 'all'")
    _refuse_unless(hf, "router_ignore_padding_tokens", (False, None), False,
                   "it routes padding tokens into expert capacity; moejax never routes padding")
    _refuse_unless(hf, "router_dtype", ("float32", None), "float32", "moejax computes every router in float32")
    d = _get(hf, "d_model", int, 1024)
    heads = {stack: _get(hf, f"{stack}_attention_heads", int, 16) for stack in ("encoder", "decoder")}
    if heads["encoder"] != heads["decoder"] or d % heads["encoder"]:
        raise ValueError(f"config.json: encoder_attention_heads={heads['encoder']}, decoder_attention_heads="
                         f"{heads['decoder']} are not supported: moejax needs equal head counts dividing d_model={d}")
    layers = {stack: _get(hf, f"{stack}_layers", int, 12) for stack in ("encoder", "decoder")}
    steps = {stack: _get(hf, f"{stack}_sparse_step", int, 4) for stack in ("encoder", "decoder")}
    fraction = float(_get(hf, "moe_eval_capacity_token_fraction", (int, float), 1.0))
    dropout = float(_get(hf, "moe_token_dropout", (int, float), 0.2))
    return dict(
        vocab_size=_get(hf, "vocab_size", int, 128112), hidden_size=d, encoder_layers=layers["encoder"],
        decoder_layers=layers["decoder"], encoder_heads=heads["encoder"], decoder_heads=heads["decoder"],
        head_dim=d // heads["encoder"], encoder_ffn_dim=_get(hf, "encoder_ffn_dim", int, 4096),
        decoder_ffn_dim=_get(hf, "decoder_ffn_dim", int, 4096),
        # a layer is sparse when (i + 1) % step == 0 (no sparse layer for a step <= 0)
        encoder_moe_layers=tuple(steps["encoder"] > 0 and (i + 1) % steps["encoder"] == 0 for i in range(layers["encoder"])),
        decoder_moe_layers=tuple(steps["decoder"] > 0 and (i + 1) % steps["decoder"] == 0 for i in range(layers["decoder"])),
        num_experts=_get(hf, "num_experts", int, 128), num_experts_per_tok=2,
        hidden_act=_get(hf, "activation_function", str, "relu"), norm="layer_norm", norm_eps=_LAYER_NORM_EPS, bias=True,
        router_bias=_get(hf, "router_bias", bool, False), scaled_attention=True, positions="sinusoidal",
        max_position_embeddings=_get(hf, "max_position_embeddings", int, 1024),
        scale_embedding=_get(hf, "scale_embedding", bool, True),
        tie_word_embeddings=_get(hf, "tie_word_embeddings", bool, True), scale_tied_logits=False,
        capacity_fraction=fraction if fraction > 0 else None,
        expert_capacity=_get({"expert_capacity": _given(hf, "expert_capacity", 64)}, "expert_capacity", int, None),
        normalize_router_prob_before_dropping=_get(hf, "normalize_router_prob_before_dropping", bool, False),
        batch_prioritized_routing=_get(hf, "batch_prioritized_routing", bool, False),
        expert_output_scale=1.0 - dropout,
        **_token_ids(hf, pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2))


def _switch(hf: dict) -> dict:
    """transformers' SwitchTransformersConfig / modeling_switch_transformers, with its defaults."""
    _refuse_unless(hf, "router_dtype", ("float32", None), "float32", "moejax computes every router in float32")
    act = _get(hf, "dense_act_fn", str, "relu")
    if act.startswith("gated-"):
        raise ValueError(f"config.json: dense_act_fn={act!r} is not supported: moejax reads Switch's non-gated FFNs")
    layers = {"encoder": _get(hf, "num_layers", int, 12)}
    layers["decoder"] = _get(hf, "num_decoder_layers", int, layers["encoder"])
    flags = {}
    for stack in ("encoder", "decoder"):
        sparse = _get(hf, f"num_sparse_{stack}_layers", int, 3)
        # SwitchTransformersConfig: the step is layers // sparse layers (layers itself for none, which still
        # makes layer 1 sparse: transformers' own rule, kept); a layer is sparse when i % step == 1 or step == 1
        step = layers[stack] // sparse if sparse > 0 else layers[stack]
        flags[stack] = tuple(step > 0 and (i % step == 1 or step == 1) for i in range(layers[stack]))
    heads = _get(hf, "num_heads", int, 12)
    return dict(
        vocab_size=_get(hf, "vocab_size", int, 32128), hidden_size=_get(hf, "d_model", int, 768),
        encoder_layers=layers["encoder"], decoder_layers=layers["decoder"], encoder_heads=heads, decoder_heads=heads,
        head_dim=_get(hf, "d_kv", int, 64), encoder_ffn_dim=_get(hf, "d_ff", int, 2048),
        decoder_ffn_dim=_get(hf, "d_ff", int, 2048), encoder_moe_layers=flags["encoder"],
        decoder_moe_layers=flags["decoder"], num_experts=_get(hf, "num_experts", int, 8), num_experts_per_tok=1,
        hidden_act=act, norm="rms_norm", norm_eps=float(_get(hf, "layer_norm_epsilon", (int, float), 1e-6)),
        bias=False, router_bias=_get(hf, "router_bias", bool, False), scaled_attention=False, positions="relative",
        relative_attention_num_buckets=_get(hf, "relative_attention_num_buckets", int, 32),
        relative_attention_max_distance=_get(hf, "relative_attention_max_distance", int, 128),
        scale_embedding=False, tie_word_embeddings=_get(hf, "tie_word_embeddings", bool, True),
        scale_tied_logits=True, expert_capacity=_get(hf, "expert_capacity", int, 64),
        **_token_ids(hf, pad_token_id=0, eos_token_id=1))


_READERS = {NLLB_MOE: _nllb_moe, SWITCH: _switch}
MODEL_TYPES = tuple(_READERS)

