"""The decoder-only MoE transformer (Flax NNX) behind every supported family, as one forward in phases.

A forward call is: `attention_context` (positions, rope, the mask), `embed`, then per layer its attention
phase and its feed-forward phase (a MoE block's own phases: route -> policy -> experts -> combine), then
`head`. `CausalLM.forward` composes them; training, buffered decoding, evaluation and generation call the
same phases. Families differ only in ModelConfig values: GQA or multi-head latent attention, q/k norm,
biases, which layers are MoE, shared experts, router flavour.
"""

from __future__ import annotations

import functools
import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moejax.config import ModelConfig
from moejax.models.attention import (Attention, AttentionContext, KVCache, LatentAttention, attention_context,
                                     init_cache)
from moejax.models.layers import MLP, Dense, LayerNorm, RMSNorm, param
from moejax.models.moe import MoEBlock
from moejax.models.rope import inverse_frequencies
from moejax.runtime import MoERuntime

__all__ = ["CausalLM", "DecoderLayer", "Dense", "ForwardOutput", "KVCache", "MoEBlock", "check_inputs",
           "check_positions", "check_token_ids", "init_cache", "output_logits"]


class DecoderLayer(nnx.Module):
    def __init__(self, config: ModelConfig, layer: int, runtime: MoERuntime, *, dtype, rngs: nnx.Rngs):
        c = config
        self.input_layernorm = norm(c, dtype)
        self.post_attention_layernorm = norm(c, dtype)
        attention = LatentAttention if c.is_mla else Attention
        self.self_attn = attention(c, dtype=dtype, rngs=rngs, layer=layer)
        if c.moe_layers[layer]:
            self.mlp = MoEBlock(c, layer, runtime, dtype=dtype, rngs=rngs)
        else:
            self.mlp = MLP(c.hidden_size, c.intermediate_size, c.hidden_act, dtype=dtype, rngs=rngs)
        self.residual_multiplier = c.residual_multiplier

    @property
    def is_moe(self) -> bool:
        return isinstance(self.mlp, MoEBlock)

    def attention_phase(self, x: jax.Array, ctx: AttentionContext, layer_cache=None):
        """x [B, T, d] -> (x + attention, the layer's updated cache)."""
        attn_out, layer_cache = self.self_attn(self.input_layernorm(x), ctx, layer_cache)
        return x + self._residual(attn_out), layer_cache

    def _residual(self, out: jax.Array) -> jax.Array:
        """A sublayer's output as it joins the residual stream (Granite scales it by residual_multiplier)."""
        return out if self.residual_multiplier == 1.0 else out * self.residual_multiplier

    def ffn_input(self, x: jax.Array) -> jax.Array:
        """The feed-forward's input: x [B, T, d] normed and flattened to [B * T, d]."""
        return self.post_attention_layernorm(x).reshape(-1, x.shape[-1])

    def feed_forward_phase(self, x: jax.Array, ctx: AttentionContext, decode: bool = False):
        """x [B, T, d] -> (x + feed-forward, Routing of the pairs computed or None, needed bucket)."""
        h = self.ffn_input(x)
        if not self.is_moe:
            return x + self._residual(self.mlp(h).reshape(x.shape)), None, jnp.zeros((), jnp.int32)
        out, r, needed = self.mlp(h, ctx.token_mask.reshape(-1), decode)
        return x + self._residual(out.reshape(x.shape)), r, needed


def norm(config: ModelConfig, dtype) -> RMSNorm | LayerNorm:
    """A layer's (and the final) norm: RMSNorm, or LayerNorm with bias (Phi-3.5-MoE) or without (DBRX), eps
    rms_norm_eps."""
    if config.norm_type in ("layer_norm", "unbiased_layer_norm"):
        return LayerNorm(config.hidden_size, config.rms_norm_eps, bias=config.norm_type == "layer_norm", dtype=dtype)
    return RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype)


class ForwardOutput(NamedTuple):
    logits: jax.Array  # float32 [B, T, vocab]
    cache: KVCache | None
    routings: tuple  # per layer: Routing for MoE layers (keep: the pairs computed; with logits), None for dense ones
    needed_bucket: jax.Array  # int32: expert-parallel dynamic gating's largest buffer count (0 on one device)


def output_logits(final_norm, head: jax.Array, x: jax.Array, bias: jax.Array | None = None) -> jax.Array:
    """The final norm and the LM head: x [..., d] -> float32 logits [..., vocab]; head [d, vocab], bias [vocab]
    (Phi-3.5-MoE) or None."""
    logits = jnp.einsum("...d,dv->...v", final_norm(x), head, preferred_element_type=jnp.float32)
    return logits if bias is None else logits + bias.astype(jnp.float32)


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
        self.norm = norm(c, dtype)
        self.lm_head = None if c.tie_word_embeddings else param(rngs, (c.hidden_size, c.vocab_size), dtype)
        self.lm_head_bias = nnx.Param(jnp.zeros((c.vocab_size,), dtype)) if c.lm_head_bias else None
        inv_freq, attention_factor = inverse_frequencies(c.rope, c.rope_dim, c.max_position_embeddings)
        self.rope = (tuple(inv_freq.tolist()), attention_factor)  # static: plain Python numbers

    def moe_blocks(self) -> list[MoEBlock]:
        return [layer.mlp for layer in self.layers if layer.is_moe]

    def next_moe_layer(self, layer: int) -> int | None:
        """The index of the first MoE layer after `layer`, None if there is none."""
        return next((i for i in range(layer + 1, self.config.num_layers) if self.config.moe_layers[i]), None)

    def __call__(self, tokens: jax.Array, token_mask: jax.Array | None = None) -> jax.Array:
        """Compiled once per shape: split into (static graph, arrays) and run the jitted forward."""
        tokens, token_mask = check_inputs(self.config, tokens, token_mask)
        graphdef, state = nnx.split(self)
        return _jitted_logits(graphdef, state, jnp.asarray(tokens), token_mask)

    # -- the phases of a forward call

    def attention_context(self, token_mask: jax.Array, positions: jax.Array | None = None,
                          cache: KVCache | None = None) -> AttentionContext:
        # each layer narrows the causal mask to its own kind (layer_allowed)
        return attention_context(token_mask, positions, cache, self.rope, None)

    def embed(self, tokens: jax.Array) -> jax.Array:
        x = self.embed_tokens[...][tokens]
        m = self.config.embedding_multiplier  # Granite
        return x if m == 1.0 else x * jnp.asarray(m, x.dtype)

    def head_weight(self) -> jax.Array:
        """[d, vocab]: the LM head (the embedding's transpose when tied)."""
        return self.embed_tokens[...].T if self.lm_head is None else self.lm_head[...]

    def head(self, x: jax.Array) -> jax.Array:
        bias = None if self.lm_head_bias is None else self.lm_head_bias[...]
        logits = output_logits(self.norm, self.head_weight(), x, bias)
        scaling = self.config.logits_scaling  # Granite divides the logits by it
        return logits if scaling == 1.0 else logits / scaling

    def forward(self, tokens: jax.Array, *, token_mask: jax.Array | None = None,
                positions: jax.Array | None = None, cache: KVCache | None = None,
                decode: bool = False) -> ForwardOutput:
        """tokens int [B, T]. token_mask bool [B, T] marks real tokens (False: padding, which attends to
        nothing useful, is attended by nothing and takes no expert slot). positions default to the count of
        real tokens before each one (plus those already in the cache). With a cache, the T new tokens are
        written at slots [cache.index, cache.index + T) and attend to every valid earlier slot."""
        tokens, token_mask = check_inputs(self.config, tokens, token_mask, positions, cache)
        b, t = tokens.shape
        ctx = self.attention_context(jnp.ones((b, t), bool) if token_mask is None else token_mask, positions, cache)
        x = self.embed(tokens)
        new_layers, routings, needed = [], [], jnp.zeros((), jnp.int32)
        for i, layer in enumerate(self.layers):
            x, layer_cache = layer.attention_phase(x, ctx, None if cache is None else cache.layers[i])
            after = self.next_moe_layer(i)
            if layer.is_moe and after is not None and self.layers[after].mlp.prefetches:
                self.layers[after].mlp.prefetch(self.layers[after].ffn_input(x), ctx.token_mask.reshape(-1), decode)
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


def check_inputs(config: ModelConfig, tokens, token_mask=None, positions=None, cache: KVCache | None = None):
    """The checks of a forward call's inputs outside jit (inside it they are traced and pass): token ids
    (`check_token_ids`), a token_mask of the tokens' shape (bool, or integers 0 / 1 as Hugging Face's
    attention_mask), and positions past max_position_embeddings (`check_positions`). -> (tokens, token_mask)."""
    tokens = check_token_ids(tokens, config.vocab_size)
    if isinstance(tokens, jax.core.Tracer):
        return tokens, token_mask
    if token_mask is not None and not isinstance(token_mask, jax.core.Tracer):
        mask = token_mask if isinstance(token_mask, jax.Array) else np.asarray(token_mask)
        if tuple(mask.shape) != tuple(tokens.shape):
            raise ValueError(f"token_mask has shape {tuple(mask.shape)}; the tokens have shape {tuple(tokens.shape)}")
        if mask.dtype != bool:
            bad = np.asarray((mask != 0) & (mask != 1))
            if mask.size and (not jnp.issubdtype(mask.dtype, jnp.integer) or bad.any()):
                where = tuple(int(i) for i in np.argwhere(bad)[0]) if bad.any() else (0,) * mask.ndim
                raise ValueError(f"token_mask must be bool (or integers 0 / 1); got dtype {mask.dtype}, value "
                                 f"{mask[where].item()!r} at position {where}")
            mask = mask.astype(bool)
        token_mask = mask
    concrete = lambda *xs: not any(isinstance(x, jax.core.Tracer) for x in xs)
    if positions is not None:
        if concrete(positions) and np.size(positions):
            check_positions(config, int(np.max(np.asarray(positions))) + 1)
    elif concrete(token_mask, *(() if cache is None else (cache.mask,))):
        real = tokens.shape[1] if token_mask is None else int(token_mask.sum(axis=1).max(initial=0))
        check_positions(config, real + (0 if cache is None else int(cache.mask.sum(axis=1).max())))
    return tokens, token_mask


def check_positions(config: ModelConfig, count: int) -> None:
    """Warn when a sequence of `count` positions runs past config.max_position_embeddings (refuse one past
    longrope's original_max_position_embeddings: its long regime is not implemented).

    A warning, not an error: every rope scheme moejax reads (default, linear, yarn) computes a position's
    angles from the position itself, with no table to run off the end of, so a longer sequence computes
    exactly what transformers computes for it. But the checkpoint was trained (yarn and linear: scaled) for
    max_position_embeddings positions; past them the model extrapolates and its quality is unknown."""
    rope = config.rope
    if rope.kind == "longrope" and count > rope.original_max_position:
        raise ValueError(f"a sequence of {count} positions runs past original_max_position_embeddings="
                         f"{rope.original_max_position}: longrope switches to its long_factor there (for the whole "
                         "sequence, in transformers), which moejax does not implement; shorten the sequence")
    if count > config.max_position_embeddings:
        warnings.warn(f"a sequence of {count} positions runs past the checkpoint's max_position_embeddings="
                      f"{config.max_position_embeddings} ({config.rope.kind} rope): positions beyond it were never "
                      "trained, so quality may degrade", UserWarning, stacklevel=4)  # the caller of model() / generate


def check_token_ids(tokens, vocab_size: int | None = None, *, ndim: int = 2, name: str = "tokens",
                    row: int | None = None):
    """The one check of token ids, at every entry point (model(), forward, generate's prompts through
    `pad_prompts`, buffered generation) -> the ids as int32 (numpy, or a jax array if given one).

    Any integer dtype is accepted (numpy, jax, nested lists of Python ints) and judged in its own dtype
    before any cast, so an int64 id 2**32 + 5 or a uint8 id is compared by its value, never wrapped.
    Floats, bools, strings, the wrong rank (`ndim`: 2 for [batch, seq], 1 for one prompt of a list, whose
    index `row` leads the positions named) and ids outside [0, vocab_size) (None: [0, 2**31), what int32
    holds) fail with a ValueError naming `name`, the value and its position. Traced arrays (inside jit)
    pass through unchecked."""
    if isinstance(tokens, jax.core.Tracer):
        return tokens
    shape = "[batch, seq]" if ndim == 2 else "[seq]"
    limit = _INT32_LIMIT if vocab_size is None else int(vocab_size)
    span = "int32's range" if vocab_size is None else "the vocabulary"
    xp = jnp if isinstance(tokens, jax.Array) else np
    try:
        ids = tokens if xp is jnp else np.asarray(tokens)
    except (ValueError, TypeError) as e:  # ragged nested lists
        raise ValueError(f"{name} must be int {shape}; got a ragged or mixed sequence ({e})") from None
    if ids.ndim != ndim:
        raise ValueError(f"{name} must be int {shape} (rank {ndim}); got shape {tuple(ids.shape)}")
    prefix = () if row is None else (row,)
    if ids.dtype == object:  # Python ints too large for int64, or things that are no numbers
        for index in np.ndindex(ids.shape):
            value = ids[index]
            if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
                raise ValueError(f"{name}: token id {value!r} at position {prefix + index} is not an integer")
            if not 0 <= value < limit:
                raise ValueError(f"token id {value} at position {prefix + index} is outside {span} [0, {limit})")
        return np.asarray(ids.tolist(), np.int32).reshape(ids.shape)
    if ids.size == 0:  # np.asarray([]) is float64; an empty sequence holds no bad id (callers refuse it if they must)
        return np.zeros(ids.shape, np.int32) if xp is np else ids.astype(jnp.int32)
    if ids.dtype == bool or not xp.issubdtype(ids.dtype, xp.integer):
        raise ValueError(f"{name} must be integer token ids; got dtype {ids.dtype} (value "
                         f"{ids.reshape(-1)[0].item()!r} at position {prefix + (0,) * ndim})")
    bad = ids < 0
    if limit <= np.iinfo(ids.dtype).max:  # compare in the ids' dtype only where the limit fits in it
        bad = bad | (ids >= xp.asarray(limit, ids.dtype))
    if bool(bad.any()):
        where = tuple(int(i) for i in xp.argwhere(bad)[0])
        raise ValueError(f"token id {int(ids[where])} at position {prefix + where} is outside {span} [0, {limit})")
    return ids.astype(xp.int32)


_INT32_LIMIT = 2**31
