"""Attention: the preallocated KV cache, grouped-query attention over it, and the two attention flavours
(GQA with the OLMoE / Qwen options, DeepSeek's multi-head latent attention)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from moejax.config import ModelConfig
from moejax.models.layers import Dense, RMSNorm
from moejax.models.rope import apply_rope, rope_angles



class KVCache(NamedTuple):
    """Preallocated cache of `size` slots, shared layout for every sequence of the batch.

    layers: per layer, (k [B, S, Hkv, D], v [B, S, Hkv, Dv]), or for latent attention (latent [B, S, r],
    k_rope [B, S, 1, Dr]). mask bool [B, S]: the slot holds a real token. positions int32 [B, S].
    index: the next slot to write (a scalar: all rows advance together; prompts are left-padded); a Python
    int where it is known at trace time, else an int32 array.
    """

    layers: tuple
    mask: jax.Array
    positions: jax.Array
    index: jax.Array

    @property
    def size(self) -> int:
        return self.mask.shape[1]


def init_cache(config: ModelConfig, batch: int, size: int, dtype) -> KVCache:
    if config.is_mla:
        shapes = ((batch, size, config.kv_lora_rank), (batch, size, 1, config.qk_rope_head_dim))
    else:
        shapes = ((batch, size, config.num_kv_heads, config.head_dim),) * 2
    layers = tuple(tuple(jnp.zeros(s, dtype) for s in shapes) for _ in range(config.num_layers))
    # index 0 stays a Python int, so the prefill that follows knows its slots statically (see attend)
    return KVCache(layers, jnp.zeros((batch, size), bool), jnp.zeros((batch, size), jnp.int32), 0)


class AttentionContext(NamedTuple):
    """What every layer's attention shares in one forward call: rope angles of the new tokens, which key
    slot each query may attend to, and where the new tokens go in the cache."""

    cos: jax.Array  # [B, T, rope_dim / 2]
    sin: jax.Array
    allowed: jax.Array  # bool [B, T, S]
    token_mask: jax.Array  # bool [B, T]: real tokens (padding attends to nothing useful, takes no expert)
    index: int | jax.Array  # the first new token's cache slot: a Python int where static (prefill)
    key_mask: jax.Array  # bool [B, S]: the cache's mask after this call
    key_positions: jax.Array  # int32 [B, S]


def attention_context(token_mask: jax.Array, positions: jax.Array | None, cache: KVCache | None,
                      rope: tuple, sliding_window: int | None) -> AttentionContext:
    """Positions (default: the count of real tokens before each one, plus those already in the cache), rope
    angles and the causal, padding- and window-aware attention mask. With a cache, the T new tokens go to
    slots [cache.index, cache.index + T) and attend to every valid earlier slot."""
    t = token_mask.shape[1]
    token_mask = token_mask.astype(bool)
    if positions is None:
        start = 0 if cache is None else cache.mask.sum(axis=1, keepdims=True)
        positions = start + jnp.cumsum(token_mask, axis=1) - 1
    positions = jnp.maximum(positions, 0).astype(jnp.int32)
    inv_freq, attention_factor = rope
    cos, sin = rope_angles(positions, jnp.asarray(inv_freq, jnp.float32), attention_factor)
    if cache is None:
        index = 0
        key_mask, key_positions, key_slots = token_mask, positions, jnp.arange(t)
    else:
        index = cache.index
        key_mask = jax.lax.dynamic_update_slice_in_dim(cache.mask, token_mask, index, axis=1)
        key_positions = jax.lax.dynamic_update_slice_in_dim(cache.positions, positions, index, axis=1)
        key_slots = jnp.arange(cache.size)
    query_slots = index + jnp.arange(t)
    allowed = key_mask[:, None, :] & (key_slots[None, None, :] <= query_slots[None, :, None])
    if sliding_window:
        allowed &= positions[:, :, None] - key_positions[:, None, :] < sliding_window
    return AttentionContext(cos, sin, allowed, token_mask, index, key_mask, key_positions)


_QUERY_CHUNK = 128  # prefill attention runs over query chunks of this size (see attend)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, allowed: jax.Array, scale: float,
           query_offset: int | None = None) -> jax.Array:
    """Grouped-query attention. q [B,T,H,D], k [B,S,Hkv,D], v [B,S,Hkv,Dv], allowed bool [B,T,S] -> [B,T,H*Dv].

    When the slot of the first query is known statically (`query_offset`: prefill), queries run in chunks
    and each chunk reads only the key slots up to its last query, since later slots are never allowed
    (causal by slot). That skips about half the work of a long prefill and keeps each chunk's scores small
    enough to stay in cache, which on the CPU matters more than the FLOPs.
    """
    b, t, h, d = q.shape
    s, hkv = k.shape[1], k.shape[2]
    q = (q * scale).reshape(b, t, hkv, h // hkv, d).transpose(0, 2, 3, 1, 4)  # [B, Hkv, G, T, D]
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, Hkv, S, D]
    bounds = [(0, t, s)]
    if query_offset is not None and t > _QUERY_CHUNK:
        bounds = [(c, min(t, c + _QUERY_CHUNK), min(s, query_offset + c + _QUERY_CHUNK))
                  for c in range(0, t, _QUERY_CHUNK)]
    outs = []
    for start, end, keys in bounds:
        logits = jnp.einsum("bkgtd,bksd->bkgts", q[:, :, :, start:end], k[:, :, :keys],
                            preferred_element_type=jnp.float32)
        logits = jnp.where(allowed[:, None, None, start:end, :keys], logits, jnp.finfo(jnp.float32).min)
        probs = jnp.exp(logits - logits.max(axis=-1, keepdims=True))
        out = jnp.einsum("bkgts,bksd->bkgtd", probs.astype(v.dtype), v[:, :, :keys],
                         preferred_element_type=jnp.float32)
        outs.append(out / probs.sum(axis=-1, keepdims=True))  # normalise [T, Dv], not [T, S]
    out = jnp.concatenate(outs, axis=3) if len(outs) > 1 else outs[0]
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h * v.shape[-1]).astype(v.dtype)


def _static(index) -> int | None:
    """The cache index as a Python int where it is known at trace time (prefill), else None."""
    return index if isinstance(index, int) else None


def _write(buffer: jax.Array, update: jax.Array, index: jax.Array) -> jax.Array:
    return jax.lax.dynamic_update_slice_in_dim(buffer, update.astype(buffer.dtype), index, axis=1)


class Attention(nnx.Module):
    """Multi-head attention with GQA; OLMoE's q/k norm and qkv clipping; Qwen's qkv biases."""

    def __init__(self, config: ModelConfig, *, dtype, rngs: nnx.Rngs):
        c = config
        d, h, hkv, hd = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim
        self.q_proj = Dense(d, h * hd, bias=c.qkv_bias, dtype=dtype, rngs=rngs)
        self.k_proj = Dense(d, hkv * hd, bias=c.qkv_bias, dtype=dtype, rngs=rngs)
        self.v_proj = Dense(d, hkv * hd, bias=c.qkv_bias, dtype=dtype, rngs=rngs)
        self.o_proj = Dense(h * hd, d, bias=c.o_bias, dtype=dtype, rngs=rngs)
        self.q_norm = RMSNorm(h * hd, c.rms_norm_eps, dtype=dtype) if c.qk_norm else None
        self.k_norm = RMSNorm(hkv * hd, c.rms_norm_eps, dtype=dtype) if c.qk_norm else None
        self.config = config

    def __call__(self, x: jax.Array, ctx: AttentionContext, layer_cache):
        """x [B, T, d] -> ([B, T, d], the layer's cache with the T new tokens written at ctx.index)."""
        c, cos, sin, index = self.config, ctx.cos, ctx.sin, ctx.index
        b, t, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if c.clip_qkv is not None:
            q, k, v = (jnp.clip(a, -c.clip_qkv, c.clip_qkv) for a in (q, k, v))
        q = apply_rope(q.reshape(b, t, c.num_heads, c.head_dim), cos, sin, c.rope.interleaved)
        k = apply_rope(k.reshape(b, t, c.num_kv_heads, c.head_dim), cos, sin, c.rope.interleaved)
        v = v.reshape(b, t, c.num_kv_heads, c.head_dim)
        if layer_cache is not None:
            k, v = _write(layer_cache[0], k, index), _write(layer_cache[1], v, index)
            layer_cache = (k, v)
        return self.o_proj(attend(q, k, v, ctx.allowed, c.attention_scale, _static(index))), layer_cache


class LatentAttention(nnx.Module):
    """DeepSeek-V2 multi-head latent attention; the cache holds the compressed latent and the shared rope key."""

    def __init__(self, config: ModelConfig, *, dtype, rngs: nnx.Rngs):
        c = config
        d, h = c.hidden_size, c.num_heads
        qk_dim = c.qk_nope_head_dim + c.qk_rope_head_dim
        if c.q_lora_rank is None:
            self.q_proj = Dense(d, h * qk_dim, dtype=dtype, rngs=rngs)
        else:
            self.q_a_proj = Dense(d, c.q_lora_rank, bias=c.qkv_bias, dtype=dtype, rngs=rngs)
            self.q_a_layernorm = RMSNorm(c.q_lora_rank, 1e-6, dtype=dtype)
            self.q_b_proj = Dense(c.q_lora_rank, h * qk_dim, dtype=dtype, rngs=rngs)
        self.kv_a_proj_with_mqa = Dense(d, c.kv_lora_rank + c.qk_rope_head_dim, bias=c.qkv_bias, dtype=dtype,
                                        rngs=rngs)
        self.kv_a_layernorm = RMSNorm(c.kv_lora_rank, 1e-6, dtype=dtype)
        self.kv_b_proj = Dense(c.kv_lora_rank, h * (c.qk_nope_head_dim + c.v_head_dim), dtype=dtype, rngs=rngs)
        self.o_proj = Dense(h * c.v_head_dim, d, bias=c.o_bias, dtype=dtype, rngs=rngs)
        self.config = config

    def __call__(self, x: jax.Array, ctx: AttentionContext, layer_cache):
        """x [B, T, d] -> ([B, T, d], the layer's cache with the T new tokens written at ctx.index)."""
        c, cos, sin, index = self.config, ctx.cos, ctx.sin, ctx.index
        b, t, _ = x.shape
        h, nope, rope_dim = c.num_heads, c.qk_nope_head_dim, c.qk_rope_head_dim
        if c.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.reshape(b, t, h, nope + rope_dim)
        q = jnp.concatenate([q[..., :nope], apply_rope(q[..., nope:], cos, sin, c.rope.interleaved)], axis=-1)
        compressed = self.kv_a_proj_with_mqa(x)
        latent = self.kv_a_layernorm(compressed[..., :c.kv_lora_rank])
        k_rope = apply_rope(compressed[..., c.kv_lora_rank:].reshape(b, t, 1, rope_dim), cos, sin,
                            c.rope.interleaved)
        if layer_cache is not None:
            latent, k_rope = _write(layer_cache[0], latent, index), _write(layer_cache[1], k_rope, index)
            layer_cache = (latent, k_rope)
        s = latent.shape[1]
        kv = self.kv_b_proj(latent).reshape(b, s, h, nope + c.v_head_dim)
        k = jnp.concatenate([kv[..., :nope], jnp.broadcast_to(k_rope, (b, s, h, rope_dim))], axis=-1)
        v = kv[..., nope:]
        return self.o_proj(attend(q, k, v, ctx.allowed, c.attention_scale, _static(index))), layer_cache
