"""The encoder-decoder MoE transformer (Flax NNX) behind NLLB-MoE and Switch Transformers, as one forward in
phases, pre-norm like both families.

The encoder: embed (NLLB: scaled, plus sinusoidal positions) -> per layer bidirectional self-attention
(Switch: plus T5's relative position bias) and its feed-forward phase -> the final norm. The decoder: the
same with causal self-attention over a preallocated KV cache and cross-attention over the encoder's
output, whose keys and values are computed once per source (`cross_keys_values`) -> the final norm and the
LM head. MoE feed-forwards are `FamilyMoEBlock`s (moejax.seq2seq.moe): moejax's MoE block in its phases,
so policies, experts backends, expert parallelism and buffering work on both stacks.

The model numbers its layers encoder first, then decoder (`layers`, MoE-layer ids, routings, traces).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moejax import stats
from moejax.models.attention import KVCache, attend, attention_context
from moejax.models.layers import Dense, LayerNorm, RMSNorm, param
from moejax.models.transformer import check_inputs, check_token_ids
from moejax.kernels import ACTIVATIONS as KERNEL_ACTIVATIONS
from moejax.config import ACTIVATIONS
from moejax.runtime import MoERuntime
from moejax.seq2seq.config import Seq2SeqConfig
from moejax.seq2seq.moe import FamilyCapacity, FamilyMoEBlock

ENCODER, DECODER = "encoder", "decoder"
_NO_ROPE = ((), 1.0)  # neither family has rotary embeddings: attention_context computes zero-width angles


def relative_position_buckets(num_buckets: int, max_distance: int, bidirectional: bool) -> np.ndarray:
    """int32 [2 * max_distance + 1]: T5's bucket of each relative position key - query in [-max_distance,
    max_distance] (every position past max_distance shares the last bucket, so the table covers all),
    computed in float32 as transformers does."""
    relative = np.arange(-max_distance, max_distance + 1)
    buckets = np.zeros(relative.shape, np.int64)
    if bidirectional:
        num_buckets //= 2
        buckets += (relative > 0) * num_buckets
        relative = np.abs(relative)
    else:
        relative = -np.minimum(relative, 0)
    max_exact = num_buckets // 2
    with np.errstate(divide="ignore"):  # log(0) where the exact buckets take over
        scaled = (np.log(relative.astype(np.float32) / np.float32(max_exact)) / np.float32(np.log(max_distance / max_exact))
                  * np.float32(num_buckets - max_exact))
    large = np.minimum(max_exact + np.where(relative > 0, scaled, 0).astype(np.int64), num_buckets - 1)
    return (buckets + np.where(relative < max_exact, relative, large)).astype(np.int32)


class RelativePositionBias(nnx.Module):
    """T5's learned relative position bias of one stack (bidirectional in the encoder, causal in the decoder)."""

    def __init__(self, config: Seq2SeqConfig, bidirectional: bool, *, dtype, rngs: nnx.Rngs):
        self.embedding = param(rngs, (config.relative_attention_num_buckets, config.decoder_heads), dtype)
        self.max_distance = config.relative_attention_max_distance
        self.buckets = tuple(relative_position_buckets(config.relative_attention_num_buckets, self.max_distance,
                                                       bidirectional).tolist())  # static: plain Python ints

    def __call__(self, query_positions: jax.Array, key_positions: jax.Array) -> jax.Array:
        """int [B, T], [B, S] -> float32 [B, H, T, S]."""
        relative = key_positions[:, None, :] - query_positions[:, :, None]
        index = jnp.clip(relative, -self.max_distance, self.max_distance) + self.max_distance
        values = self.embedding[...].astype(jnp.float32)[jnp.asarray(self.buckets, jnp.int32)[index]]
        return values.transpose(0, 3, 1, 2)


def sinusoidal_embeddings(positions: jax.Array, dim: int, padding_idx: int) -> jax.Array:
    """NLLB's (fairseq's) sinusoidal embeddings of positions int [B, T] -> float32 [B, T, dim]: [sin | cos] of
    position * 10000^(-i / (dim/2 - 1)), a zero column for odd dims, zeros at position padding_idx."""
    half = dim // 2
    frequencies = jnp.exp(jnp.arange(half, dtype=jnp.float32) * np.float32(-np.log(10000) / (half - 1)))
    angles = positions.astype(jnp.float32)[..., None] * frequencies
    table = jnp.concatenate([jnp.sin(angles), jnp.cos(angles)] + ([jnp.zeros_like(angles[..., :1])] if dim % 2 else []),
                            axis=-1)
    return jnp.where((positions == padding_idx)[..., None], 0.0, table)


def nllb_positions(tokens: jax.Array, pad_token_id: int, start) -> jax.Array:
    """NLLB's (fairseq's make_positions) position of each token: padding_idx + 1 + (the count of non-pad
    tokens up to it, plus `start`, the tokens already in the cache); pad tokens get padding_idx."""
    real = (tokens != pad_token_id).astype(jnp.int32)
    return (jnp.cumsum(real, axis=1) + start) * real + pad_token_id


class MultiHeadAttention(nnx.Module):
    """Multi-head attention of both families: q / k / v / o projections (with biases in NLLB); keys and
    values come from the layer's own input (self-attention) or the encoder's output (cross-attention)."""

    def __init__(self, config: Seq2SeqConfig, *, dtype, rngs: nnx.Rngs):
        d, inner = config.hidden_size, config.decoder_heads * config.head_dim
        self.q_proj = Dense(d, inner, bias=config.bias, dtype=dtype, rngs=rngs)
        self.k_proj = Dense(d, inner, bias=config.bias, dtype=dtype, rngs=rngs)
        self.v_proj = Dense(d, inner, bias=config.bias, dtype=dtype, rngs=rngs)
        self.o_proj = Dense(inner, d, bias=config.bias, dtype=dtype, rngs=rngs)
        self.heads, self.head_dim, self.scale = config.decoder_heads, config.head_dim, config.attention_scale

    def keys_values(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x [B, S, d] -> (k, v) [B, S, H, head_dim]."""
        b, s, _ = x.shape
        return (self.k_proj(x).reshape(b, s, self.heads, self.head_dim),
                self.v_proj(x).reshape(b, s, self.heads, self.head_dim))

    def __call__(self, x, keys_values, allowed, bias=None, query_offset=None) -> jax.Array:
        """x [B, T, d] attending to keys_values over `allowed` [B, T, S] -> [B, T, d]."""
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, self.heads, self.head_dim)
        return self.o_proj(attend(q, *keys_values, allowed, self.scale, query_offset, bias))


class FeedForward(nnx.Module):
    """A dense layer's FFN: act(x @ up (+ b)) @ down (+ b) (NLLB's fc1 / fc2, Switch's wi / wo)."""

    def __init__(self, config: Seq2SeqConfig, hidden: int, *, dtype, rngs: nnx.Rngs):
        self.up_proj = Dense(config.hidden_size, hidden, bias=config.bias, dtype=dtype, rngs=rngs)
        self.down_proj = Dense(hidden, config.hidden_size, bias=config.bias, dtype=dtype, rngs=rngs)
        self.act = KERNEL_ACTIVATIONS[ACTIVATIONS[config.hidden_act]]

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(self.act(self.up_proj(x)))


def _norm(config: Seq2SeqConfig, dtype):
    if config.norm == "layer_norm":
        return LayerNorm(config.hidden_size, config.norm_eps, dtype=dtype)
    return RMSNorm(config.hidden_size, config.norm_eps, dtype=dtype)


class Seq2SeqLayer(nnx.Module):
    """One encoder or decoder layer: self-attention, cross-attention (decoder only), feed-forward; each
    sublayer normed first and added to the residual stream."""

    def __init__(self, config: Seq2SeqConfig, stack: str, layer: int, runtime: MoERuntime, *, dtype, rngs: nnx.Rngs):
        moe = config.moe_layers[layer]
        ffn = config.encoder_ffn_dim if stack == ENCODER else config.decoder_ffn_dim
        self.self_attn_norm = _norm(config, dtype)
        self.self_attn = MultiHeadAttention(config, dtype=dtype, rngs=rngs)
        self.cross_attn_norm = _norm(config, dtype) if stack == DECODER else None
        self.cross_attn = MultiHeadAttention(config, dtype=dtype, rngs=rngs) if stack == DECODER else None
        self.ffn_norm = _norm(config, dtype)
        self.mlp = (FamilyMoEBlock(config, stack, layer, runtime, dtype=dtype, rngs=rngs) if moe
                    else FeedForward(config, ffn, dtype=dtype, rngs=rngs))
        self.stack = stack

    @property
    def is_moe(self) -> bool:
        return isinstance(self.mlp, FamilyMoEBlock)

    def self_attention_phase(self, x, allowed, bias=None, layer_cache=None, index=None):
        """x [B, T, d] -> (x + self-attention, the layer's cache with the T new keys / values written at
        `index`); without a cache the keys are the T tokens themselves."""
        h = self.self_attn_norm(x)
        k, v = self.self_attn.keys_values(h)
        offset = None
        if layer_cache is not None:
            k, v = (jax.lax.dynamic_update_slice_in_dim(c, new.astype(c.dtype), index, axis=1)
                    for c, new in zip(layer_cache, (k, v)))
            layer_cache = (k, v)
            offset = index if isinstance(index, int) else None  # a static prefill slot lets attend tile
        return x + self.self_attn(h, (k, v), allowed, bias, offset), layer_cache

    def cross_attention_phase(self, x, cross_keys_values, allowed):
        return x + self.cross_attn(self.cross_attn_norm(x), cross_keys_values, allowed)

    def ffn_input(self, x: jax.Array) -> jax.Array:
        return self.ffn_norm(x).reshape(-1, x.shape[-1])

    def feed_forward_phase(self, x: jax.Array, token_mask: jax.Array, decode: bool = False):
        """x [B, T, d], token_mask bool [B, T] -> (x + feed-forward, Routing of the pairs computed or None,
        needed bucket)."""
        h = self.ffn_input(x)
        if not self.is_moe:
            return x + self.mlp(h).reshape(x.shape), None, jnp.zeros((), jnp.int32)
        out, r, needed = self.mlp(h, token_mask, decode)
        return x + out.reshape(x.shape), r, needed


class EncoderOutput(NamedTuple):
    hidden: jax.Array  # [B, S, d] after the encoder's final norm
    routings: tuple  # per encoder layer: Routing (MoE layers) or None


class Seq2SeqOutput(NamedTuple):
    """One forward's output. The routings of each stack are kept apart (encoder_routings per encoder layer,
    decoder_routings per decoder layer; None for dense layers and for a stack the call did not run);
    `routings` is both in the model's layer numbering."""

    logits: jax.Array  # float32 [B, T_dec, vocab]
    cache: KVCache | None  # the decoder's self-attention cache after the call
    encoder_routings: tuple
    decoder_routings: tuple
    needed_bucket: jax.Array  # int32: expert-parallel dynamic gating's largest buffer count (0 on one device)

    @property
    def routings(self) -> tuple:
        return self.encoder_routings + self.decoder_routings

    def layer_loads(self, source_mask, decoder_mask, top_k: int) -> dict[str, dict]:
        """moejax.stats.layer_loads of each stack over its own real tokens (source_mask, decoder_mask
        [B, T]): {"encoder": {layer: LayerLoads}, "decoder": {layer: LayerLoads}}, layers in the model's
        numbering (decoder layers after the encoder's)."""
        encoder = stats.layer_loads(self.encoder_routings, source_mask, top_k)
        decoder = stats.layer_loads(self.decoder_routings, decoder_mask, top_k)
        first = len(self.encoder_routings)
        return {ENCODER: encoder, DECODER: {first + layer: loads for layer, loads in decoder.items()}}


class EncoderDecoderLM(nnx.Module):
    """`model(source_ids, decoder_input_ids=...)` -> float32 logits [B, T_dec, vocab]."""

    is_encoder_decoder = True  # moejax.generate runs its encoder once, then the decode loop

    def __init__(self, config: Seq2SeqConfig, *, dtype=jnp.float32, runtime: MoERuntime | None = None,
                 policy=None, rngs: nnx.Rngs):
        c = config
        if runtime is None:
            runtime = MoERuntime(FamilyCapacity() if policy is None else policy)
        elif policy is not None:
            raise ValueError("EncoderDecoderLM: pass policy= or runtime=, not both")
        self.config = config
        self.dtype = jnp.dtype(dtype)
        # tied: one matrix for both stacks and the head; untied (transformers 5): one each
        self.embed_tokens = param(rngs, (c.vocab_size, c.hidden_size), dtype)
        self.decoder_embed_tokens = None if c.tie_word_embeddings else param(rngs, (c.vocab_size, c.hidden_size), dtype)
        self.layers = nnx.List([Seq2SeqLayer(c, ENCODER if i < c.encoder_layers else DECODER, i, runtime, dtype=dtype,
                                             rngs=rngs) for i in range(c.num_layers)])
        self.encoder_norm = _norm(c, dtype)
        self.decoder_norm = _norm(c, dtype)
        self.lm_head = None if c.tie_word_embeddings else param(rngs, (c.hidden_size, c.vocab_size), dtype)
        relative = c.positions == "relative"
        self.encoder_position_bias = RelativePositionBias(c, True, dtype=dtype, rngs=rngs) if relative else None
        self.decoder_position_bias = RelativePositionBias(c, False, dtype=dtype, rngs=rngs) if relative else None

    @property
    def encoder_layers(self) -> list[Seq2SeqLayer]:
        return list(self.layers)[:self.config.encoder_layers]

    @property
    def decoder_layers(self) -> list[Seq2SeqLayer]:
        return list(self.layers)[self.config.encoder_layers:]

    def moe_blocks(self) -> list[FamilyMoEBlock]:
        return [layer.mlp for layer in self.layers if layer.is_moe]

    def __call__(self, source_ids, decoder_input_ids, source_mask=None, decoder_mask=None) -> jax.Array:
        """Compiled once per shape: split into (static graph, arrays) and run the jitted forward."""
        source_ids, source_mask, decoder_input_ids, decoder_mask = self.check_inputs(
            source_ids, decoder_input_ids, source_mask, decoder_mask)
        graphdef, state = nnx.split(self)
        return _jitted_logits(graphdef, state, source_ids, decoder_input_ids, source_mask, decoder_mask)

    def check_inputs(self, source_ids, decoder_input_ids, source_mask=None, decoder_mask=None):
        """The checks of a forward's inputs outside jit (token ids in the vocabulary, masks of the tokens'
        shapes, NLLB's positions) -> (source_ids, source_mask, decoder_input_ids, decoder_mask), masks filled."""
        view = self.config.moe_config(ENCODER)
        if decoder_input_ids is None:
            raise ValueError("decoder_input_ids is required (int [batch, target length]); moejax.generate builds "
                             "them from the decoder start token")
        source_ids, source_mask = check_inputs(view, check_token_ids(source_ids, self.config.vocab_size,
                                                                     name="source_ids"), source_mask)
        decoder_input_ids, decoder_mask = check_inputs(view, check_token_ids(
            decoder_input_ids, self.config.vocab_size, name="decoder_input_ids"), decoder_mask)
        if source_ids.shape[0] != decoder_input_ids.shape[0]:
            raise ValueError(f"source_ids has {source_ids.shape[0]} rows, decoder_input_ids {decoder_input_ids.shape[0]}")
        self.check_lengths(source_ids, decoder_input_ids.shape[1])
        fill = lambda ids, mask: jnp.ones(ids.shape, bool) if mask is None else jnp.asarray(mask, bool)
        return (jnp.asarray(source_ids), fill(source_ids, source_mask), jnp.asarray(decoder_input_ids),
                fill(decoder_input_ids, decoder_mask))

    def check_lengths(self, source_ids, decoder_length: int) -> None:
        """NLLB's positions stop at max_position_embeddings: a source with more non-pad tokens, or a target
        with more tokens, fails naming it (T5's relative positions have no limit)."""
        c = self.config
        if c.positions != "sinusoidal" or isinstance(source_ids, jax.core.Tracer):
            return
        counts = np.asarray(source_ids != c.pad_token_id).sum(axis=1)
        if counts.size and counts.max() > c.max_position_embeddings:
            row = int(counts.argmax())
            raise ValueError(f"source {row} has {int(counts[row])} tokens; {c.architecture}'s positions allow at most "
                             f"max_position_embeddings={c.max_position_embeddings}")
        if decoder_length > c.max_position_embeddings:
            raise ValueError(f"a target of {decoder_length} tokens is longer than {c.architecture}'s positions allow "
                             f"(max_position_embeddings={c.max_position_embeddings})")

    # -- the phases

    def embed(self, tokens: jax.Array, stack: str, start=0) -> jax.Array:
        """The stack's token embeddings (NLLB: times sqrt(d), plus the sinusoidal position of each token;
        `start`: the tokens already in the decoder's cache)."""
        c = self.config
        table = self.embed_tokens if stack == ENCODER or self.decoder_embed_tokens is None else self.decoder_embed_tokens
        x = table[...][tokens]
        if c.scale_embedding:
            x = x * jnp.asarray(np.sqrt(c.hidden_size), x.dtype)
        if c.positions == "sinusoidal":
            positions = nllb_positions(tokens, c.pad_token_id, start)
            x = x + sinusoidal_embeddings(positions, c.hidden_size, c.pad_token_id).astype(x.dtype)
        return x

    def encode(self, source_ids: jax.Array, source_mask: jax.Array) -> EncoderOutput:
        """source_ids int [B, S], source_mask bool [B, S] -> the encoder's output and routings."""
        s = source_ids.shape[1]
        allowed = jnp.broadcast_to(source_mask[:, None, :], (source_ids.shape[0], s, s))
        bias = None
        if self.encoder_position_bias is not None:
            index = jnp.arange(s)[None]
            bias = self.encoder_position_bias(index, index)
        x, routings, layers = self.embed(source_ids, ENCODER), [], self.encoder_layers
        for i, layer in enumerate(layers):
            x, _ = layer.self_attention_phase(x, allowed, bias)
            _prefetch_next(layers, i, x, source_mask, False)
            x, r, _ = layer.feed_forward_phase(x, source_mask)
            routings.append(r)
        return EncoderOutput(self.encoder_norm(x), tuple(routings))

    def cross_keys_values(self, encoded: jax.Array) -> tuple:
        """Per decoder layer, the cross-attention's (k, v) [B, S, H, head_dim] of the encoder's output."""
        return tuple(layer.cross_attn.keys_values(encoded) for layer in self.decoder_layers)

    def init_cache(self, batch: int, size: int) -> KVCache:
        """An empty decoder self-attention cache of `size` slots (index 0 stays a Python int: static prefill)."""
        c = self.config
        shape = (batch, size, c.decoder_heads, c.head_dim)
        layers = tuple((jnp.zeros(shape, self.dtype), jnp.zeros(shape, self.dtype)) for _ in range(c.decoder_layers))
        return KVCache(layers, jnp.zeros((batch, size), bool), jnp.zeros((batch, size), jnp.int32), 0)

    def decoder_forward(self, tokens: jax.Array, cross_keys_values: tuple, source_mask: jax.Array, *,
                        token_mask: jax.Array | None = None, cache: KVCache | None = None,
                        decode: bool = False) -> Seq2SeqOutput:
        """The decoder on tokens int [B, T] (token_mask bool [B, T]: real tokens; padding takes no expert
        slot), attending to the encoder's keys / values over source_mask [B, S]. With a cache the T tokens go
        to slots [cache.index, cache.index + T) and attend to every valid earlier slot."""
        b, t = tokens.shape
        token_mask = jnp.ones((b, t), bool) if token_mask is None else token_mask
        ctx = attention_context(token_mask, None, cache, _NO_ROPE, None)
        bias = None
        if self.decoder_position_bias is not None:
            bias = self.decoder_position_bias(ctx.positions, ctx.key_positions)
        cross_allowed = jnp.broadcast_to(source_mask[:, None, :], (b, t, source_mask.shape[1]))
        x = self.embed(tokens, DECODER, 0 if cache is None else cache.index)
        new_layers, routings, needed, layers = [], [], jnp.zeros((), jnp.int32), self.decoder_layers
        for i, layer in enumerate(layers):
            x, layer_cache = layer.self_attention_phase(x, ctx.allowed, bias, None if cache is None else cache.layers[i],
                                                        ctx.index)
            x = layer.cross_attention_phase(x, cross_keys_values[i], cross_allowed)
            _prefetch_next(layers, i, x, token_mask, decode)
            x, r, layer_needed = layer.feed_forward_phase(x, token_mask, decode)
            new_layers.append(layer_cache)
            routings.append(r)
            needed = jnp.maximum(needed, layer_needed)
        new_cache = None if cache is None else KVCache(tuple(new_layers), ctx.key_mask, ctx.key_positions, ctx.index + t)
        return Seq2SeqOutput(self.head(x), new_cache, (None,) * self.config.encoder_layers, tuple(routings), needed)

    def head_weight(self) -> jax.Array:
        """[d, vocab]: the LM head (the shared embedding's transpose when tied)."""
        return self.embed_tokens[...].T if self.lm_head is None else self.lm_head[...]

    def head(self, x: jax.Array) -> jax.Array:
        """The decoder's final norm and the LM head -> float32 logits (T5 scales a tied head's input)."""
        h = self.decoder_norm(x)
        if self.config.scale_tied_logits and self.lm_head is None:
            h = h * jnp.asarray(self.config.hidden_size**-0.5, h.dtype)
        return jnp.einsum("...d,dv->...v", h, self.head_weight(), preferred_element_type=jnp.float32)

    def forward(self, source_ids: jax.Array, decoder_input_ids: jax.Array, *, source_mask: jax.Array | None = None,
                decoder_mask: jax.Array | None = None) -> Seq2SeqOutput:
        """The whole model on (source, decoder input) pairs: the forward training and evaluation use (logits
        and both stacks' routings, with the router logits); masks default to every token real."""
        source_ids, source_mask, decoder_input_ids, decoder_mask = self.check_inputs(
            source_ids, decoder_input_ids, source_mask, decoder_mask)
        encoded = self.encode(source_ids, source_mask)
        out = self.decoder_forward(decoder_input_ids, self.cross_keys_values(encoded.hidden), source_mask,
                                   token_mask=decoder_mask)
        return out._replace(encoder_routings=encoded.routings)


def _prefetch_next(layers: list[Seq2SeqLayer], i: int, x: jax.Array, token_mask: jax.Array, decode: bool) -> None:
    """Buffered prefetch within a stack, as CausalLM.forward does it: after MoE layer i's attention, the
    stack's next MoE layer predicts its experts from this residual stream (through its own norm)."""
    after = next((j for j in range(i + 1, len(layers)) if layers[j].is_moe), None)
    if layers[i].is_moe and after is not None and layers[after].mlp.prefetches:
        layers[after].mlp.prefetch(layers[after].ffn_input(x), token_mask, decode)


@functools.partial(jax.jit, static_argnums=0)
def _jitted_logits(graphdef, state, source_ids, decoder_input_ids, source_mask, decoder_mask):
    model = nnx.merge(graphdef, state)
    return model.forward(source_ids, decoder_input_ids, source_mask=source_mask, decoder_mask=decoder_mask).logits


def random_model(config: Seq2SeqConfig, seed: int = 0, dtype=jnp.float32, policy=None) -> EncoderDecoderLM:
    """A randomly initialised encoder-decoder model (normal(0, 0.02) weights) for tests and demos."""
    return EncoderDecoderLM(config, dtype=dtype, policy=policy, rngs=nnx.Rngs(seed))
