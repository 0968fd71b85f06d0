"""The decoder-only MoE transformer (Flax NNX) behind every supported family, as one forward in phases.

A forward call is: `attention_context` (positions, rope, the mask), `embed`, then per layer its attention
phase and its feed-forward phase (a MoE block's own phases: route -> policy -> experts -> combine), then
`head`. `CausalLM.forward` composes them; training, buffered decoding, evaluation and generation call the
same phases. Families differ only in ModelConfig values: GQA or multi-head latent attention, q/k norm,
biases, which layers are MoE, shared experts, router flavour.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from moejax.config import ModelConfig
from moejax.models.attention import (Attention, AttentionContext, KVCache, LatentAttention, attention_context,
                                     init_cache)
from moejax.models.layers import MLP, Dense, RMSNorm, param
from moejax.models.moe import MoEBlock
from moejax.models.rope import inverse_frequencies
from moejax.runtime import MoERuntime

__all__ = ["CausalLM", "DecoderLayer", "Dense", "ForwardOutput", "KVCache", "MoEBlock", "check_token_ids",
           "init_cache", "output_logits"]


class DecoderLayer(nnx.Module):
    def __init__(self, config: ModelConfig, layer: int, runtime: MoERuntime, *, dtype, rngs: nnx.Rngs):
        c = config
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, dtype=dtype)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, dtype=dtype)
        attention = LatentAttention if c.is_mla else Attention
        self.self_attn = attention(c, dtype=dtype, rngs=rngs)
        if c.moe_layers[layer]:
            self.mlp = MoEBlock(c, layer, runtime, dtype=dtype, rngs=rngs)
        else:
            self.mlp = MLP(c.hidden_size, c.intermediate_size, c.hidden_act, dtype=dtype, rngs=rngs)

    @property
    def is_moe(self) -> bool:
        return isinstance(self.mlp, MoEBlock)

    def attention_phase(self, x: jax.Array, ctx: AttentionContext, layer_cache=None):
        """x [B, T, d] -> (x + attention, the layer's updated cache)."""
        attn_out, layer_cache = self.self_attn(self.input_layernorm(x), ctx, layer_cache)
        return x + attn_out, layer_cache

    def ffn_input(self, x: jax.Array) -> jax.Array:
        """The feed-forward's input: x [B, T, d] normed and flattened to [B * T, d]."""
        return self.post_attention_layernorm(x).reshape(-1, x.shape[-1])

    def feed_forward_phase(self, x: jax.Array, ctx: AttentionContext, decode: bool = False):
        """x [B, T, d] -> (x + feed-forward, Routing of the pairs computed or None, needed bucket)."""
        h = self.ffn_input(x)
        if not self.is_moe:
            return x + self.mlp(h).reshape(x.shape), None, jnp.zeros((), jnp.int32)
        out, r, needed = self.mlp(h, ctx.token_mask.reshape(-1), decode)
        return x + out.reshape(x.shape), r, needed


class ForwardOutput(NamedTuple):
    logits: jax.Array  # float32 [B, T, vocab]
    cache: KVCache | None
    routings: tuple  # per layer: Routing for MoE layers (keep: the pairs computed; with logits), None for dense ones
    needed_bucket: jax.Array  # int32: expert-parallel dynamic gating's largest buffer count (0 on one device)


def output_logits(norm: RMSNorm, head: jax.Array, x: jax.Array) -> jax.Array:
    """The final norm and the LM head: x [..., d] -> float32 logits [..., vocab]; head [d, vocab]."""
    return jnp.einsum("...d,dv->...v", norm(x), head, preferred_element_type=jnp.float32)


class CausalLM(nnx.Module):
    """Decoder-only MoE language model. `model(tokens)` -> float32 logits [B, T, vocab]."""

    def __init__(self, config: ModelConfig, *, dtype=jnp.float32, runtime: MoERuntime | None = None,
                 policy=None, rngs: nnx.Rngs):
        c = config
        if runtime is None:
            runtime = MoERuntime() if policy is None else MoERuntime(policy)
        elif policy is not None:
            raise ValueError("CausalLM: pass policy= or runtime=, not both")
        self.config = config
        self.dtype = jnp.dtype(dtype)
        self.embed_tokens = param(rngs, (c.vocab_size, c.hidden_size), dtype)
        self.layers = nnx.List([DecoderLayer(c, i, runtime, dtype=dtype, rngs=rngs) for i in range(c.num_layers)])
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps, dtype=dtype)
        self.lm_head = None if c.tie_word_embeddings else param(rngs, (c.hidden_size, c.vocab_size), dtype)
        inv_freq, attention_factor = inverse_frequencies(c.rope, c.rope_dim, c.max_position_embeddings)
        self.rope = (tuple(inv_freq.tolist()), attention_factor)  # static: plain Python numbers

    def moe_blocks(self) -> list[MoEBlock]:
        return [layer.mlp for layer in self.layers if layer.is_moe]

    def __call__(self, tokens: jax.Array, token_mask: jax.Array | None = None) -> jax.Array:
        """Compiled once per shape: split into (static graph, arrays) and run the jitted forward."""
        check_token_ids(tokens, self.config.vocab_size)
        graphdef, state = nnx.split(self)
        return _jitted_logits(graphdef, state, jnp.asarray(tokens), token_mask)

    # -- the phases of a forward call

    def attention_context(self, token_mask: jax.Array, positions: jax.Array | None = None,
                          cache: KVCache | None = None) -> AttentionContext:
        return attention_context(token_mask, positions, cache, self.rope, self.config.sliding_window)

    def embed(self, tokens: jax.Array) -> jax.Array:
        return self.embed_tokens[...][tokens]

    def head_weight(self) -> jax.Array:
        """[d, vocab]: the LM head (the embedding's transpose when tied)."""
        return self.embed_tokens[...].T if self.lm_head is None else self.lm_head[...]

    def head(self, x: jax.Array) -> jax.Array:
        return output_logits(self.norm, self.head_weight(), x)

    def forward(self, tokens: jax.Array, *, token_mask: jax.Array | None = None,
                positions: jax.Array | None = None, cache: KVCache | None = None,
                decode: bool = False) -> ForwardOutput:
        """tokens int [B, T]. token_mask bool [B, T] marks real tokens (False: padding, which attends to
        nothing useful, is attended by nothing and takes no expert slot). positions default to the count of
        real tokens before each one (plus those already in the cache). With a cache, the T new tokens are
        written at slots [cache.index, cache.index + T) and attend to every valid earlier slot."""
        check_token_ids(tokens, self.config.vocab_size)
        b, t = tokens.shape
        ctx = self.attention_context(jnp.ones((b, t), bool) if token_mask is None else token_mask, positions, cache)
        x = self.embed(tokens)
        new_layers, routings, needed = [], [], jnp.zeros((), jnp.int32)
        for i, layer in enumerate(self.layers):
            x, layer_cache = layer.attention_phase(x, ctx, None if cache is None else cache.layers[i])
            x, r, layer_needed = layer.feed_forward_phase(x, ctx, decode)
            new_layers.append(layer_cache)
            routings.append(r)
            needed = jnp.maximum(needed, layer_needed)
        new_cache = None
        if cache is not None:
            new_cache = KVCache(tuple(new_layers), ctx.key_mask, ctx.key_positions, ctx.index + t)
        return ForwardOutput(self.head(x), new_cache, tuple(routings), needed)


@functools.partial(jax.jit, static_argnums=0)
def _jitted_logits(graphdef, state, tokens, token_mask):
    # jax.jit over split state: nnx.jit's per-call graph bookkeeping costs tens of ms at these sizes
    return nnx.merge(graphdef, state).forward(tokens, token_mask=token_mask).logits


def check_token_ids(tokens, vocab_size: int) -> None:
    """Token ids outside [0, vocab) fail loudly where they can be seen (outside jit)."""
    if isinstance(tokens, jax.core.Tracer):
        return
    tokens = jnp.asarray(tokens)
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be int [batch, seq]; got shape {tokens.shape}")
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"tokens must be integers; got dtype {tokens.dtype}")
    bad = (tokens < 0) | (tokens >= vocab_size)
    if bool(bad.any()):
        where = tuple(int(i) for i in jnp.argwhere(bad)[0])
        raise ValueError(f"token id {int(tokens[where])} at position {where} is outside the vocabulary "
                         f"[0, {vocab_size})")
