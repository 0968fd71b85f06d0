"""Tiny random Hugging Face encoder-decoder MoE checkpoints (NLLB-MoE, Switch Transformers), built from a
config with no download: the parity references of moejax.seq2seq.

transformers 5.x's NllbMoeExperts dispatches on the values of the top-1 mask (one_hot of a 0/1 mask), so
only experts 0 and 1 ever run; transformers 4.x, fairseq and the NLLB-MoE paper send each token to the
experts its router kept (router_probs > 0) with those weights. `build` gives NLLB models the 4.x expert
dispatch (`fairseq_sparse_mlp_forward`, HF's own router and expert modules), which moejax implements."""

from __future__ import annotations

import types

import torch
import transformers

_NLLB = dict(vocab_size=96, d_model=32, encoder_layers=2, decoder_layers=2, encoder_ffn_dim=48, decoder_ffn_dim=48,
             encoder_attention_heads=4, decoder_attention_heads=4, max_position_embeddings=64, init_std=0.3)
_SWITCH = dict(vocab_size=96, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2, num_heads=4,
               relative_attention_num_buckets=8, relative_attention_max_distance=16, decoder_start_token_id=0)

# name -> (config class, model class, config kwargs): sparse steps, numbers of experts, capacity that does
# and does not bind, the families' routing options.
VARIANTS = {
    "nllb-e4-step2": ("NllbMoeConfig", "NllbMoeForConditionalGeneration", dict(
        _NLLB, num_experts=4, encoder_sparse_step=2, decoder_sparse_step=2)),
    "nllb-e8-all-sparse-binding-prioritized-untied": ("NllbMoeConfig", "NllbMoeForConditionalGeneration", dict(
        _NLLB, num_experts=8, encoder_layers=3, encoder_sparse_step=1, decoder_sparse_step=1,
        moe_eval_capacity_token_fraction=0.2, batch_prioritized_routing=True,
        normalize_router_prob_before_dropping=True, router_bias=True, tie_word_embeddings=False,
        scale_embedding=False, moe_token_dropout=0.0)),
    "nllb-e6-expert-capacity-binding": ("NllbMoeConfig", "NllbMoeForConditionalGeneration", dict(
        _NLLB, num_experts=6, encoder_sparse_step=1, decoder_sparse_step=2, moe_eval_capacity_token_fraction=-1.0,
        expert_capacity=3)),
    "switch-e4-one-sparse": ("SwitchTransformersConfig", "SwitchTransformersForConditionalGeneration", dict(
        _SWITCH, num_experts=4, num_sparse_encoder_layers=1, num_sparse_decoder_layers=1)),
    "switch-e8-all-sparse-binding-untied": ("SwitchTransformersConfig", "SwitchTransformersForConditionalGeneration",
                                            dict(_SWITCH, num_experts=8, num_layers=3, num_sparse_encoder_layers=3,
                                                 num_sparse_decoder_layers=2, expert_capacity=2, router_bias=True,
                                                 tie_word_embeddings=False)),
}


def fairseq_sparse_mlp_forward(self, hidden_states, padding_mask=None):
    """NllbMoeSparseMLP.forward as transformers 4.x computed it: each token through every expert its router
    kept, weighted by the router's combine weight (times 1 - moe_token_dropout at inference)."""
    batch, length, dim = hidden_states.shape
    flat = hidden_states.reshape(-1, dim)
    _, router_probs, _ = self.router(flat, padding_mask)
    out = torch.zeros_like(flat)
    for e in range(self.num_experts):
        rows = router_probs[:, e] > 0
        if rows.any():
            y = self.experts[f"expert_{e}"](flat[rows]) * router_probs[rows, e, None]
            if self.experts.moe_token_dropout > 0 and not self.training:
                y = y * (1 - self.experts.moe_token_dropout)
            out[rows] += y.to(out.dtype)
    return out.reshape(batch, length, dim)


def build(name: str, seed: int = 0, router_scale: float = 8.0):
    """A random transformers model of variant `name` in eval mode, routers scaled by `router_scale` so that
    top-k choices have wide margins (float rounding cannot flip them); NLLB with the 4.x expert dispatch."""
    config_cls, model_cls, kwargs = VARIANTS[name]
    config = getattr(transformers, config_cls)(**kwargs)
    config.eos_token_id = None  # generate exactly max_new_tokens
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():
        for module_name, p in model.named_parameters():
            if "router.classifier" in module_name:
                p.mul_(router_scale)
    return use_fairseq_experts(model)


def use_fairseq_experts(model):
    """The model with every NllbMoeSparseMLP dispatching as transformers 4.x did (module docstring)."""
    for module in model.modules():
        if isinstance(module, transformers.models.nllb_moe.modeling_nllb_moe.NllbMoeSparseMLP):
            module.forward = types.MethodType(fairseq_sparse_mlp_forward, module)
    return model


def save(name: str, directory, seed: int = 0):
    model = build(name, seed)
    model.save_pretrained(directory)
    return model


def loader(tmp_path_factory):
    """name -> (transformers model, moejax model loaded from its save_pretrained directory, directory), each
    built once per test module."""
    from moejax import seq2seq

    cache = {}

    def get(name):
        if name not in cache:
            directory = tmp_path_factory.mktemp(name)
            reference = save(name, directory)
            cache[name] = reference, seq2seq.load_pretrained(directory), directory
        return cache[name]

    return get
