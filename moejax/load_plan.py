"""The load plan: for each parameter of a moejax CausalLM, the Hugging Face checkpoint tensors it is built from
(with their expected shapes), how to build it from them (transposes, stacking experts, unfusing gate and up)
and how to split it back (export). One plan serves load_pretrained (moejax.checkpoints reads it) and
export_pretrained; each family's tensor names live here and nowhere else.
"""

from __future__ import annotations

from typing import Callable, Iterator, NamedTuple, Sequence

import jax
import numpy as np
from flax import nnx

from moejax.models.transformer import CausalLM, Dense, MoEBlock

Source = tuple[str, tuple[int, ...]]
_GRANITE = ("granitemoe", "granitemoeshared", "granitemoe_swa")
# the names under a MoE block (mlp) of its router, shared experts and e_score_correction_bias where a family's are
# not gate, shared_expert and gate.e_score_correction_bias
_ROUTER_NAMES = {"hy_v3": "router.gate"}
_SHARED_EXPERT_NAMES = {"hy_v3": "shared_mlp", **{a: "shared_experts" for a in (
    "deepseek_v2", "deepseek_v3", "glm4_moe", "ernie4_5_moe", "dots1", "exaone_moe", "solar_open", "glm4_moe_lite",
    "sarvam_moe")}}
_SCORE_BIAS_NAMES = {"minimax_m2": "e_score_correction_bias", "exaone_moe": "e_score_correction_bias",
                     "sarvam_moe": "gate.expert_bias", "hy_v3": "expert_bias"}
_BLOCK_SPARSE_MOE = ("mixtral", "minimax_m2", "phimoe")  # block_sparse_moe.{gate, experts.{i}.w1 / w3 / w2}


class PlanItem(NamedTuple):
    param: nnx.Param
    sources: list[Source]
    build: Callable[..., np.ndarray]
    split: Callable[[np.ndarray], list[np.ndarray]]


class Plan:
    def __init__(self):
        self.items: list[PlanItem] = []

    def linear(self, dense: Dense, name: str):
        din, dout = dense.kernel.shape
        self.items.append(PlanItem(dense.kernel, [(f"{name}.weight", (dout, din))], lambda w: w.T, lambda k: [k.T]))
        if dense.bias is not None:
            self.copy(dense.bias, f"{name}.bias")

    def copy(self, param: nnx.Param, name: str, transpose: bool = False):
        shape = tuple(param.shape)[::-1] if transpose else tuple(param.shape)
        flip = (lambda w: w.T) if transpose else (lambda w: w)
        self.items.append(PlanItem(param, [(name, shape)], flip, lambda w: [flip(w)]))

    def norm(self, norm, name: str):
        """An RMSNorm's weight, or a LayerNorm's weight and bias."""
        self.copy(norm.weight, f"{name}.weight")
        if getattr(norm, "bias", None) is not None:
            self.copy(norm.bias, f"{name}.bias")

    def stacked(self, param: nnx.Param, names: list[str], per_expert_shape: tuple[int, ...]):
        """[E, a, b] from E tensors of shape [b, a] (HF Linear weights, one per expert)."""
        self.items.append(PlanItem(param, [(n, per_expert_shape) for n in names],
                                   lambda *ws: np.stack([w.T for w in ws]), lambda w: [we.T for we in w]))

    def fused(self, params: Sequence[nnx.Param], name: str, *, transposed: bool = False, interleaved: bool = False):
        """Parameters stored as one tensor: their last axes joined one after another (gate then up; q, k then
        v), or (`interleaved`, two of one size) gate, up, gate, up, ... column by column, as GPT-OSS stores them;
        the last two axes swapped where `transposed` (HF Linear rows). Each item's split rebuilds the whole
        tensor from all of them."""
        sizes = [p.shape[-1] for p in params]

        def unfuse(w):
            w = np.swapaxes(w, -1, -2) if transposed else w
            return (w[..., 0::2], w[..., 1::2]) if interleaved else tuple(np.split(w, np.cumsum(sizes)[:-1], axis=-1))

        def fuse(_):
            parts = [np.asarray(jax.device_get(p.get_value())) for p in params]
            w = (np.stack(parts, axis=-1).reshape(*parts[0].shape[:-1], -1) if interleaved
                 else np.concatenate(parts, axis=-1))
            return [np.swapaxes(w, -1, -2) if transposed else w]

        shape = [*params[0].shape[:-1], sum(sizes)]
        if transposed:
            shape[-1], shape[-2] = shape[-2], shape[-1]
        for i, param in enumerate(params):
            self.items.append(PlanItem(param, [(name, tuple(shape))], lambda w, i=i: unfuse(w)[i], fuse))

    def fused_linear(self, denses: Sequence[Dense], name: str):
        """Dense layers stored as one HF Linear (their output rows one after another: q, k, v), biases too."""
        self.fused([d.kernel for d in denses], f"{name}.weight", transposed=True)
        if denses[0].bias is not None:
            self.fused([d.bias for d in denses], f"{name}.bias")

    def sources(self) -> Iterator[Source]:
        for item in self.items:
            yield from item.sources


def _fused_experts(plan: Plan, moe: MoEBlock, gate_up: str, down: str):
    """Experts stored whole as transformers v5 holds them: gate_up [E, 2f, d] (gate rows first), down [E, d, f]."""
    plan.fused((moe.w_gate, moe.w_up), gate_up, transposed=True)
    e, f, d = moe.w_down.shape
    swap = lambda w: np.swapaxes(w, 1, 2)
    plan.items.append(PlanItem(moe.w_down, [(down, (e, d, f))], swap, lambda w: [swap(w)]))


def _granite_moe(plan: Plan, layer, c, p: str):
    """Granite's parallel-experts layout: block_sparse_moe.{router.layer, input_linear, output_linear} (Granite-MoE-SWA:
    transformers' own {router, experts.gate_up_proj, experts.down_proj}) and the layer's shared_mlp.{input_linear
    [2s, d] (gate rows first), output_linear}."""
    moe, b = layer.mlp, f"{p}.block_sparse_moe"
    swa = c.architecture == "granitemoe_swa"
    plan.copy(moe.router, f"{b}.router.weight" if swa else f"{b}.router.layer.weight", transpose=True)
    _fused_experts(plan, moe, *((f"{b}.experts.gate_up_proj", f"{b}.experts.down_proj") if swa
                                else (f"{b}.input_linear.weight", f"{b}.output_linear.weight")))
    if moe.shared is not None:
        plan.fused_linear((moe.shared.gate_proj, moe.shared.up_proj), f"{p}.shared_mlp.input_linear")
        plan.linear(moe.shared.down_proj, f"{p}.shared_mlp.output_linear")


def _gpt_oss_moe(plan: Plan, moe: MoEBlock, p: str):
    """GPT-OSS: mlp.router.{weight, bias}; mlp.experts.gate_up_proj [E, d, 2f] and its bias [E, 2f], gate and
    up interleaved column by column; down_proj [E, f, d] and its bias, in moejax's own orientation."""
    plan.copy(moe.router, f"{p}.mlp.router.weight", transpose=True)
    plan.copy(moe.router_bias, f"{p}.mlp.router.bias")
    experts = f"{p}.mlp.experts"
    plan.fused((moe.w_gate, moe.w_up), f"{experts}.gate_up_proj", interleaved=True)
    plan.fused((moe.gate_bias, moe.up_bias), f"{experts}.gate_up_proj_bias", interleaved=True)
    plan.copy(moe.w_down, f"{experts}.down_proj")
    plan.copy(moe.down_bias, f"{experts}.down_proj_bias")


def _in_out_moe(plan: Plan, moe: MoEBlock, prefix: str, gate_up: str, down: str, shared: str):
    """A router [E, d], experts stored in moejax's orientation: gate_up [E, d, 2f] (gate first) and down [E, f, d]
    (Llama 4: feed_forward.{router, experts.gate_up_proj, experts.down_proj, shared_expert}; Aria:
    mlp.{router, experts.fc1.weight, experts.fc2.weight, shared_experts}), and the shared experts' MLP."""
    plan.copy(moe.router, f"{prefix}.router.weight", transpose=True)
    plan.fused((moe.w_gate, moe.w_up), f"{prefix}.{gate_up}")
    plan.copy(moe.w_down, f"{prefix}.{down}")
    _mlp(plan, moe.shared, f"{prefix}.{shared}")


def _experts(plan: Plan, moe: MoEBlock, prefix: str, names: set[str], block_sparse: bool):
    e, d, f = moe.w_gate.shape
    if f"{prefix}.experts.gate_up_proj" in names:  # transformers v5 in-memory layout
        _fused_experts(plan, moe, f"{prefix}.experts.gate_up_proj", f"{prefix}.experts.down_proj")
        return
    gate, up, down = ("w1", "w3", "w2") if block_sparse else ("gate_proj", "up_proj", "down_proj")
    plan.stacked(moe.w_gate, [f"{prefix}.experts.{i}.{gate}.weight" for i in range(e)], (f, d))
    plan.stacked(moe.w_up, [f"{prefix}.experts.{i}.{up}.weight" for i in range(e)], (f, d))
    plan.stacked(moe.w_down, [f"{prefix}.experts.{i}.{down}.weight" for i in range(e)], (d, f))


def _mlp(plan: Plan, mlp, prefix: str):
    for proj in ("gate_proj", "up_proj", "down_proj"):
        plan.linear(getattr(mlp, proj), f"{prefix}.{proj}")


def _attention(plan: Plan, attn, c, p: str):
    if c.is_mla:
        if c.q_lora_rank is None:
            plan.linear(attn.q_proj, f"{p}.self_attn.q_proj")
        else:
            plan.linear(attn.q_a_proj, f"{p}.self_attn.q_a_proj")
            plan.copy(attn.q_a_layernorm.weight, f"{p}.self_attn.q_a_layernorm.weight")
            plan.linear(attn.q_b_proj, f"{p}.self_attn.q_b_proj")
        plan.linear(attn.kv_a_proj_with_mqa, f"{p}.self_attn.kv_a_proj_with_mqa")
        plan.copy(attn.kv_a_layernorm.weight, f"{p}.self_attn.kv_a_layernorm.weight")
        plan.linear(attn.kv_b_proj, f"{p}.self_attn.kv_b_proj")
    elif c.architecture == "sarvam_moe":  # the Hub's names: q, k and v rows in one tensor
        plan.fused_linear((attn.q_proj, attn.k_proj, attn.v_proj), f"{p}.attention.query_key_value")
        if attn.q_norm is not None:
            plan.copy(attn.q_norm.weight, f"{p}.attention.query_layernorm.weight")
            plan.copy(attn.k_norm.weight, f"{p}.attention.key_layernorm.weight")
    else:
        for proj in ("q_proj", "k_proj", "v_proj"):
            plan.linear(getattr(attn, proj), f"{p}.self_attn.{proj}")
        if attn.q_norm is not None:
            plan.copy(attn.q_norm.weight, f"{p}.self_attn.q_norm.weight")
            plan.copy(attn.k_norm.weight, f"{p}.self_attn.k_norm.weight")
        if attn.sinks is not None:  # Flint's checkpoints call them softmax_offset
            plan.copy(attn.sinks, f"{p}.self_attn.{'softmax_offset' if c.architecture == 'flint' else 'sinks'}")
    plan.linear(attn.o_proj, f"{p}.attention.dense" if c.architecture == "sarvam_moe" else f"{p}.self_attn.o_proj")


def _moe(plan: Plan, moe: MoEBlock, c, p: str, names: set[str]):
    """The MoE blocks of the families that name them mlp (or block_sparse_moe) with a gate as router."""
    block_sparse = c.architecture in _BLOCK_SPARSE_MOE
    prefix = f"{p}.block_sparse_moe" if block_sparse and f"{p}.block_sparse_moe.gate.weight" in names else f"{p}.mlp"
    plan.copy(moe.router, f"{prefix}.{_ROUTER_NAMES.get(c.architecture, 'gate')}.weight", transpose=True)
    if moe.score_bias is not None and c.architecture == "ernie4_5_moe":  # [1, E], beside the gate
        bias = [(f"{prefix}.moe_statics.e_score_correction_bias", (1, c.num_experts))]
        plan.items.append(PlanItem(moe.score_bias, bias, lambda b: b.reshape(-1), lambda b: [b.reshape(1, -1)]))
    elif moe.score_bias is not None:  # on the gate, or on the block
        name = _SCORE_BIAS_NAMES.get(c.architecture, "gate.e_score_correction_bias")
        plan.copy(moe.score_bias, f"{prefix}.{name}")
    _experts(plan, moe, prefix, names, block_sparse)
    if moe.shared is not None:
        shared = _SHARED_EXPERT_NAMES.get(c.architecture, "shared_expert")
        _mlp(plan, moe.shared, f"{prefix}.{shared}")
    if moe.shared_gate is not None:
        plan.copy(moe.shared_gate, f"{prefix}.shared_expert_gate.weight", transpose=True)


def _dbrx(model: CausalLM) -> Plan:
    """DBRX's names: transformer.{wte, norm_f, blocks.{i}}; a block's norm_attn_norm.{norm_1, attn.{Wqkv (q|k|v
    rows), out_proj}, norm_2} and ffn.{router.layer, experts.mlp.{w1, v1, w2}}, each expert weight [E * f, d]
    (w1 and v1 rows of each expert's gate and up, w2 its down projection as moejax orients it)."""
    result = Plan()
    result.copy(model.embed_tokens, "transformer.wte.weight")
    result.norm(model.norm, "transformer.norm_f")
    result.copy(model.lm_head, "lm_head.weight", transpose=True)
    for i, layer in enumerate(model.layers):
        p = f"transformer.blocks.{i}"
        attn, moe = layer.self_attn, layer.mlp
        result.norm(layer.input_layernorm, f"{p}.norm_attn_norm.norm_1")
        result.norm(layer.post_attention_layernorm, f"{p}.norm_attn_norm.norm_2")
        result.fused_linear((attn.q_proj, attn.k_proj, attn.v_proj), f"{p}.norm_attn_norm.attn.Wqkv")
        result.linear(attn.o_proj, f"{p}.norm_attn_norm.attn.out_proj")
        result.copy(moe.router, f"{p}.ffn.router.layer.weight", transpose=True)
        e, f, d = moe.w_down.shape
        rows = lambda w: np.swapaxes(w.reshape(e, f, d), 1, 2)  # [E * f, d] -> [E, d, f]
        unrows = lambda w: [np.swapaxes(w, 1, 2).reshape(e * f, d)]
        for param, name in ((moe.w_gate, "w1"), (moe.w_up, "v1")):
            result.items.append(PlanItem(param, [(f"{p}.ffn.experts.mlp.{name}", (e * f, d))], rows, unrows))
        result.items.append(PlanItem(moe.w_down, [(f"{p}.ffn.experts.mlp.w2", (e * f, d))],
                                     lambda w: w.reshape(e, f, d), lambda w: [w.reshape(e * f, d)]))
    return result


def unrun_prefixes(c) -> tuple[str, ...]:
    """The name prefixes of checkpoint tensors a forward never runs, transformers' as moejax's: the
    multi-token-prediction layers, after the decoder's (DeepSeek-V3, GLM-4.5) or under mtp. (EXAONE-MoE, whose
    transformers implementation ignores them whatever its config says)."""
    after_decoder = tuple(f"model.layers.{c.num_layers + j}." for j in range(c.mtp_layers))
    return after_decoder + (("mtp.",) if c.architecture == "exaone_moe" else ())


def plan(model: CausalLM, names: set[str]) -> Plan:
    """The load plan of `model`; `names`: the checkpoint's tensor names, where a family stores a layer in one
    of two layouts (Mixtral's block_sparse_moe or mlp, per-expert or v5-fused experts)."""
    c = model.config
    if c.architecture == "dbrx":
        return _dbrx(model)
    result = Plan()
    embed = "model.word_embeddings.weight" if c.architecture == "sarvam_moe" else "model.embed_tokens.weight"
    result.copy(model.embed_tokens, embed)
    result.norm(model.norm, "model.norm")
    if model.lm_head is not None:
        result.copy(model.lm_head, "lm_head.weight", transpose=True)
    if model.lm_head_bias is not None:
        result.copy(model.lm_head_bias, "lm_head.bias")
    feed_forward = "feed_forward" if c.architecture == "llama4_text" else "mlp"
    for i, layer in enumerate(model.layers):
        p = f"model.layers.{i}"
        result.norm(layer.input_layernorm, f"{p}.input_layernorm")
        result.norm(layer.post_attention_layernorm, f"{p}.post_attention_layernorm")
        _attention(result, layer.self_attn, c, p)
        if not layer.is_moe:
            _mlp(result, layer.mlp, f"{p}.{feed_forward}")
        elif c.architecture in _GRANITE:
            _granite_moe(result, layer, c, p)
        elif c.architecture == "gpt_oss":
            _gpt_oss_moe(result, layer.mlp, p)
        elif c.architecture == "llama4_text":
            _in_out_moe(result, layer.mlp, f"{p}.feed_forward", "experts.gate_up_proj", "experts.down_proj",
                        "shared_expert")
        elif c.architecture == "aria_text":
            _in_out_moe(result, layer.mlp, f"{p}.mlp", "experts.fc1.weight", "experts.fc2.weight", "shared_experts")
        else:
            _moe(result, layer.mlp, c, p, names)
    return result
