"""Load NLLB-MoE and Switch Transformers checkpoints (config.json + safetensors) into EncoderDecoderLM, and
export one as an nllb-moe checkpoint that transformers' NllbMoeForConditionalGeneration loads.

The safetensors reading (`_Tensors`), the load plan (moejax.load_plan's `Plan`: each parameter, the
checkpoint tensors it is built from, how to build it and split it back) and its checked fill and write are
moejax.checkpoints' own; this module only says, per family, which tensor is which parameter. Every tensor is accounted for before the model is returned:
a missing, unexpected, mis-shaped or non-floating-point one raises an error naming it and its file.
"""

from __future__ import annotations

import re

import numpy as np
from flax import nnx

from moejax.capacity import MoEPolicy
from moejax.checkpoints import (_check_policy, _float_dtype, _Tensors, checkpoint_directory, checkpoint_kind,
                                fill_from_checkpoint, read_config_files, restore_converted_model, write_checkpoint)
from moejax.load_plan import Plan, PlanItem
from moejax.models import with_expert_storage
from moejax.models.moe import check_expert_storage
from moejax.seq2seq.config import NLLB_MOE, SWITCH, Seq2SeqConfig, from_hf_config
from moejax.seq2seq.model import EncoderDecoderLM, Seq2SeqLayer

# Tensors a checkpoint may carry that moejax recomputes (NLLB's sinusoid table).
_IGNORED = re.compile(r".*embed_positions\.weights?$")


def read_config(path: str) -> Seq2SeqConfig:
    """The Seq2SeqConfig of a checkpoint directory: config.json, with generation_config.json's token ids."""
    return read_config_files(path, from_hf_config)[0]


def _vector_stack(plan: Plan, param: nnx.Param, names: list[str], size: int):
    """[E, n] from E tensors of shape [n] (one bias per expert)."""
    plan.items.append(PlanItem(param, [(n, (size,)) for n in names], lambda *bs: np.stack(bs), lambda b: list(b)))


def _moe(plan: Plan, block, prefix: str, up: str, down: str):
    """A family MoE block: the router's classifier (and bias), experts.expert_{j}.{up, down} (and biases)."""
    e, d, f = block.w_up.shape
    plan.copy(block.router, f"{prefix}.router.classifier.weight", transpose=True)
    if block.router_bias is not None:
        plan.copy(block.router_bias, f"{prefix}.router.classifier.bias")
    experts = [f"{prefix}.experts.expert_{j}" for j in range(e)]
    plan.stacked(block.w_up, [f"{x}.{up}.weight" for x in experts], (f, d))
    plan.stacked(block.w_down, [f"{x}.{down}.weight" for x in experts], (d, f))
    if block.up_bias is not None:
        _vector_stack(plan, block.up_bias, [f"{x}.{up}.bias" for x in experts], f)
        _vector_stack(plan, block.down_bias, [f"{x}.{down}.bias" for x in experts], d)


def _feed_forward(plan: Plan, layer: Seq2SeqLayer, prefix: str, up: str, down: str):
    """A layer's dense FFN ({prefix}.{up}, {prefix}.{down}) or MoE block."""
    if layer.is_moe:
        _moe(plan, layer.mlp, prefix, up, down)
    else:
        plan.linear(layer.mlp.up_proj, f"{prefix}.{up}")
        plan.linear(layer.mlp.down_proj, f"{prefix}.{down}")


def _attention(plan: Plan, attention, prefix: str, names: tuple[str, str, str, str]):
    for proj, name in zip(("q_proj", "k_proj", "v_proj", "o_proj"), names):
        plan.linear(getattr(attention, proj), f"{prefix}.{name}")


def _nllb_layer(plan: Plan, layer: Seq2SeqLayer, p: str):
    projections = ("q_proj", "k_proj", "v_proj", "out_proj")
    plan.norm(layer.self_attn_norm, f"{p}.self_attn_layer_norm")
    _attention(plan, layer.self_attn, f"{p}.self_attn", projections)
    if layer.cross_attn is not None:
        plan.norm(layer.cross_attn_norm, f"{p}.cross_attention_layer_norm")
        _attention(plan, layer.cross_attn, f"{p}.cross_attention", projections)
    plan.norm(layer.ffn_norm, f"{p}.ff_layer_norm")
    _feed_forward(plan, layer, f"{p}.ffn", "fc1", "fc2")


def _switch_layer(plan: Plan, layer: Seq2SeqLayer, p: str):
    """T5's block: layer.0 self-attention, (decoder) layer.1 cross-attention, the last one the feed-forward."""
    plan.norm(layer.self_attn_norm, f"{p}.layer.0.layer_norm")
    _attention(plan, layer.self_attn, f"{p}.layer.0.SelfAttention", ("q", "k", "v", "o"))
    ffn = 1
    if layer.cross_attn is not None:
        plan.norm(layer.cross_attn_norm, f"{p}.layer.1.layer_norm")
        _attention(plan, layer.cross_attn, f"{p}.layer.1.EncDecAttention", ("q", "k", "v", "o"))
        ffn = 2
    plan.norm(layer.ffn_norm, f"{p}.layer.{ffn}.layer_norm")
    _feed_forward(plan, layer, f"{p}.layer.{ffn}.mlp", "wi", "wo")


def _root(config: Seq2SeqConfig) -> str:
    return "model." if config.architecture == NLLB_MOE else ""


def _stack_embeddings(config: Seq2SeqConfig) -> tuple[str, str]:
    return tuple(f"{_root(config)}{stack}.embed_tokens.weight" for stack in ("encoder", "decoder"))


def _plan(model: EncoderDecoderLM, names: set[str]) -> Plan:
    c = model.config
    plan = Plan()
    nllb = c.architecture == NLLB_MOE
    root = _root(c)
    if model.decoder_embed_tokens is None:
        plan.copy(model.embed_tokens, f"{root}shared.weight")
    else:  # transformers 5 unties every embedding (tie_word_embeddings=false); 4.x files hold shared only
        for param, name in zip((model.embed_tokens, model.decoder_embed_tokens), _stack_embeddings(c)):
            plan.copy(param, name if name in names else f"{root}shared.weight")
    if model.lm_head is not None:
        plan.copy(model.lm_head, "lm_head.weight", transpose=True)
    for stack, layers, norm in (("encoder", model.encoder_layers, model.encoder_norm),
                                ("decoder", model.decoder_layers, model.decoder_norm)):
        for i, layer in enumerate(layers):
            if nllb:
                _nllb_layer(plan, layer, f"model.{stack}.layers.{i}")
            else:
                _switch_layer(plan, layer, f"{stack}.block.{i}")
        plan.norm(norm, f"{root}{stack}.layer_norm" if nllb else f"{stack}.final_layer_norm")
    if not nllb:  # T5 keeps each stack's relative position bias in its first block
        for stack, bias in (("encoder", model.encoder_position_bias), ("decoder", model.decoder_position_bias)):
            plan.copy(bias.embedding, f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight")
    return plan


def load_pretrained(path: str, dtype="float32", policy: MoEPolicy | None = None, mesh=None,
                    gating: str | None = None, expert_storage: str = "stacked",
                    **parallel_options) -> EncoderDecoderLM:
    """An EncoderDecoderLM from a Hugging Face NLLB-MoE or Switch Transformers checkpoint directory, or from
    one moejax.save_converted wrote of an encoder-decoder model, its parameters cast to `dtype`. policy None keeps the family's own capacity (moejax.seq2seq.moe); with a
    `mesh` the MoE blocks of both stacks run expert-parallel (moejax.parallel.expert_parallel).
    expert_storage: "stacked" or "split" (faster decode on the CPU), as moejax.load_pretrained's."""
    path = checkpoint_directory(path)
    dtype = _float_dtype(dtype)
    _check_policy(policy)
    check_expert_storage(expert_storage)
    if mesh is None and (gating is not None or parallel_options):
        raise ValueError("load_pretrained: gating and expert-parallel options need a mesh= (moejax.parallel.make_mesh())")
    kind = checkpoint_kind(path)
    if kind == "converted":
        model = restore_converted_model(path, EncoderDecoderLM, Seq2SeqConfig.from_dict, policy, dtype)
    elif kind == "huggingface":
        model = _read_huggingface(path, dtype, policy)
    elif kind == "both":
        raise ValueError(f"{path!r} holds both a Hugging Face checkpoint and a converted one: it is unclear which "
                         "to load; move the converted one (moejax_config.json and its params directory) elsewhere")
    else:
        raise FileNotFoundError(f"{path!r} holds no Hugging Face checkpoint (config.json + safetensors) and no "
                                "converted one (moejax.save_converted)")
    for block in model.moe_blocks():  # the model is ours alone: each block's stacked experts go once split
        block.hold_experts(expert_storage)
    if mesh is not None:
        from moejax import parallel

        model = parallel.expert_parallel(model, mesh, "dynamic" if gating is None else gating, **parallel_options)
    return model


def _read_huggingface(path: str, dtype, policy: MoEPolicy | None) -> EncoderDecoderLM:
    config = read_config(path)
    model = nnx.eval_shape(lambda: EncoderDecoderLM(config, dtype=dtype, policy=policy, rngs=nnx.Rngs(0)))
    tensors = _Tensors(path)
    names = tensors.names()
    # copies of a tied matrix; an untied model's shared matrix where both stacks have their own (unused)
    copies = {"lm_head.weight", *_stack_embeddings(config)} if config.tie_word_embeddings else {
        f"{_root(config)}shared.weight"}
    fill_from_checkpoint(_plan(model, names), tensors, path, config.architecture,
                         lambda name: bool(_IGNORED.match(name)) or name in copies)
    return model


# ---------------------------------------------------------------------------------------------------------
# Export


def to_hf_config(config: Seq2SeqConfig, dtype="float32") -> dict:
    """The config.json of `config` in its own family (nllb-moe or switch_transformers): the inverse of
    seq2seq.config.from_hf_config; fails naming the field the family's config cannot express."""
    return {NLLB_MOE: _nllb_moe_config, SWITCH: _switch_config}[config.architecture](config, str(dtype))


def _nllb_moe_config(c: Seq2SeqConfig, dtype: str) -> dict:
    def step(flags: tuple[bool, ...], stack: str) -> int:
        # NllbMoeConfig places MoE layers where (i + 1) % step == 0 (none for a step of 0)
        for s in [0, *range(1, len(flags) + 2)]:
            if flags == tuple(s > 0 and (i + 1) % s == 0 for i in range(len(flags))):
                return s
        raise ValueError(f"cannot export as {NLLB_MOE}: {stack}_moe_layers={flags} is no sparse step's pattern")

    return {
        "model_type": NLLB_MOE, "architectures": ["NllbMoeForConditionalGeneration"], "is_encoder_decoder": True,
        "vocab_size": c.vocab_size, "d_model": c.hidden_size, "encoder_layers": c.encoder_layers,
        "decoder_layers": c.decoder_layers, "encoder_attention_heads": c.encoder_heads,
        "decoder_attention_heads": c.decoder_heads, "encoder_ffn_dim": c.encoder_ffn_dim,
        "decoder_ffn_dim": c.decoder_ffn_dim, "num_experts": c.num_experts,
        "encoder_sparse_step": step(c.encoder_moe_layers, "encoder"),
        "decoder_sparse_step": step(c.decoder_moe_layers, "decoder"), "activation_function": c.hidden_act,
        "max_position_embeddings": c.max_position_embeddings, "scale_embedding": c.scale_embedding,
        "tie_word_embeddings": c.tie_word_embeddings, "router_bias": c.router_bias, "router_dtype": "float32",
        "router_ignore_padding_tokens": False, "second_expert_policy": "all",
        "moe_eval_capacity_token_fraction": -1.0 if c.capacity_fraction is None else c.capacity_fraction,
        "expert_capacity": c.expert_capacity,
        "normalize_router_prob_before_dropping": c.normalize_router_prob_before_dropping,
        "batch_prioritized_routing": c.batch_prioritized_routing,
        "moe_token_dropout": 1.0 - c.expert_output_scale, "pad_token_id": c.pad_token_id,
        "bos_token_id": c.bos_token_id,
        "eos_token_id": list(c.eos_token_id) if isinstance(c.eos_token_id, tuple) else c.eos_token_id,
        "decoder_start_token_id": c.decoder_start_token_id, "dtype": dtype,
        # training-only settings, at transformers' defaults' inference value (ignored by moejax)
        "dropout": 0.0, "attention_dropout": 0.0, "activation_dropout": 0.0, "encoder_layerdrop": 0.0,
        "decoder_layerdrop": 0.0,
    }


def _switch_config(c: Seq2SeqConfig, dtype: str) -> dict:
    def sparse_layers(flags: tuple[bool, ...], stack: str) -> int:
        # SwitchTransformersConfig's rule (seq2seq.config._switch): step = layers // sparse layers (layers for
        # none), a layer sparse when i % step == 1 or step == 1
        n = len(flags)
        for sparse in range(n + 1):
            step = n // sparse if sparse > 0 else n
            if flags == tuple(step > 0 and (i % step == 1 or step == 1) for i in range(n)):
                return sparse
        raise ValueError(f"cannot export as {SWITCH}: {stack}_moe_layers={flags} is no num_sparse_{stack}_layers' "
                         "pattern")

    for a, b, name in ((c.encoder_ffn_dim, c.decoder_ffn_dim, "encoder_ffn_dim / decoder_ffn_dim"),
                       (c.encoder_heads, c.decoder_heads, "encoder_heads / decoder_heads")):
        if a != b:
            raise ValueError(f"cannot export as {SWITCH}: {name} = {a} / {b}; SwitchTransformersConfig has one value")
    return {
        "model_type": SWITCH, "architectures": ["SwitchTransformersForConditionalGeneration"],
        "is_encoder_decoder": True, "vocab_size": c.vocab_size, "d_model": c.hidden_size, "d_kv": c.head_dim,
        "d_ff": c.encoder_ffn_dim, "num_layers": c.encoder_layers, "num_decoder_layers": c.decoder_layers,
        "num_sparse_encoder_layers": sparse_layers(c.encoder_moe_layers, "encoder"),
        "num_sparse_decoder_layers": sparse_layers(c.decoder_moe_layers, "decoder"), "num_heads": c.encoder_heads,
        "num_experts": c.num_experts, "expert_capacity": c.expert_capacity, "router_bias": c.router_bias,
        "router_dtype": "float32", "router_ignore_padding_tokens": False, "dense_act_fn": c.hidden_act,
        "layer_norm_epsilon": c.norm_eps, "relative_attention_num_buckets": c.relative_attention_num_buckets,
        "relative_attention_max_distance": c.relative_attention_max_distance,
        "tie_word_embeddings": c.tie_word_embeddings, "pad_token_id": c.pad_token_id, "bos_token_id": c.bos_token_id,
        "eos_token_id": list(c.eos_token_id) if isinstance(c.eos_token_id, tuple) else c.eos_token_id,
        "decoder_start_token_id": c.decoder_start_token_id, "dtype": dtype,
        # training-only settings at their inference value (ignored by moejax)
        "dropout_rate": 0.0, "router_jitter_noise": 0.0,
    }


def export_pretrained(model: EncoderDecoderLM, directory: str, tokenizer=None, *, overwrite: bool = False) -> None:
    """Write `model` as a Hugging Face checkpoint of its family (config.json + model.safetensors, and the
    `tokenizers` tokenizer as tokenizer.json if given): the inverse of load_pretrained, which transformers'
    NllbMoeForConditionalGeneration or SwitchTransformersForConditionalGeneration loads too. Expert-parallel
    models are exported from their single-device originals. `directory` must be new or empty, or with
    overwrite=True is replaced whole (moejax.checkpoints.write_checkpoint)."""
    if any(block.runtime.sharded for block in model.moe_blocks()):
        raise ValueError("export_pretrained needs the single-device model (expert weights are permuted on a mesh)")
    model = with_expert_storage(model, "stacked")  # the checkpoint's tensors come from stacked experts
    hf_config = to_hf_config(model.config, model.dtype)
    plan = _plan(model, set(_stack_embeddings(model.config)))
    if model.decoder_embed_tokens is not None:  # transformers keeps the (then unused) shared matrix too
        plan.copy(model.embed_tokens, f"{_root(model.config)}shared.weight")
    write_checkpoint(plan, hf_config, directory, tokenizer, overwrite=overwrite)
