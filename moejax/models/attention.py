"""Attention: the preallocated KV cache, grouped-query attention over it (with GPT-OSS's sinks), each layer's
mask (full, sliding, chunked), and the two attention flavours (GQA with the OLMoE / Qwen / GPT-OSS / Llama 4
options, DeepSeek's multi-head latent attention)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from moejax.config import ModelConfig
from moejax.models.layers import Dense, RMSNorm, rms_normalize
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
    positions: jax.Array | None = None  # int32 [B, T]: the new tokens' positions


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
    return AttentionContext(cos, sin, allowed, token_mask, index, key_mask, key_positions, positions)


def layer_allowed(ctx: AttentionContext, kind: str, sliding_window: int | None = None,
                  chunk_size: int | None = None) -> jax.Array:
    """bool [B, T, S]: ctx.allowed (causal, padding) narrowed to a layer's attention kind, by position (so a
    left-padded prompt sees what it sees alone): "sliding_attention" the keys less than sliding_window
    positions back, "chunked_attention" the keys of the query's own chunk of chunk_size positions (Llama 4),
    "full_attention" all of them."""
    query, key = ctx.positions[:, :, None], ctx.key_positions[:, None, :]
    if kind == "sliding_attention":
        return ctx.allowed & (query - key < sliding_window)
    if kind == "chunked_attention":
        return ctx.allowed & (query // chunk_size == key // chunk_size)
    return ctx.allowed


# prefill attention's query and key block (see tiled_attention): 128, 256 and 128 x 512 were level within this
# 2-core CPU's noise in a whole prefill (experiments/results/bench_forward_cpu.md); 256 had the best rounds
_BLOCK = 256


def attend(q: jax.Array, k: jax.Array, v: jax.Array, allowed: jax.Array, scale: float,
           query_offset: int | None = None, bias: jax.Array | None = None,
           sinks: jax.Array | None = None) -> jax.Array:
    """Grouped-query attention. q [B,T,H,D], k [B,S,Hkv,D], v [B,S,Hkv,Dv], allowed bool [B,T,S] -> [B,T,H*Dv].
    bias: float32 [B or 1, H, T, S] added to the scaled logits (T5's relative positions), or None.
    sinks: [H] (GPT-OSS): a logit per head that joins every softmax's denominator and attends to nothing, so
    a query may give less than all of its attention to the keys; None: no sinks.

    The one place that picks how: where the slot of the first query is known statically (`query_offset`:
    prefill) and T spans more than a block: `jax.nn.dot_product_attention` on a GPU (cuDNN; 2-byte floats)
    and a TPU (XLA's), both with q and v heads of one size, `tiled_attention` elsewhere (the CPU, latent
    attention); a decode step (one query) or a short call: `reference_attention`.
    """
    b, t, h, _ = q.shape
    how = attention_implementation(jax.default_backend(), q.dtype, q.shape[-1] == v.shape[-1],
                                   query_offset is not None and t > _BLOCK)
    if how == "tiled":
        out = tiled_attention(q, k, v, allowed, scale, query_offset, bias=bias, sinks=sinks)
    elif how == "reference":
        out = reference_attention(q, k, v, allowed, scale, bias, sinks)
    else:
        out = fused_attention(q, k, v, allowed, scale, how, bias, sinks)
    return out.reshape(b, t, h * v.shape[-1]).astype(v.dtype)


def fused_attention(q, k, v, allowed, scale, implementation: str, bias=None, sinks=None):
    """jax.nn.dot_product_attention with `implementation` "cudnn" or "xla" (XLA's own, fused on a TPU):
    reference_attention's semantics for every query allowed at least one key. -> [B,T,H,Dv]. Sinks become
    one more key, zero with a zero value, whose logit is the sink through the bias (the op takes no sinks)."""
    if sinks is not None:
        b, t, h, _ = q.shape
        zero_key = lambda a: jnp.concatenate([a, jnp.zeros((b, 1, *a.shape[2:]), a.dtype)], axis=1)
        k, v = zero_key(k), zero_key(v)
        bias = jnp.zeros((1, h, t, allowed.shape[-1]), jnp.float32) if bias is None else bias.astype(jnp.float32)
        sink_column = jnp.broadcast_to(sinks.astype(jnp.float32)[None, :, None, None], (bias.shape[0], h, t, 1))
        bias = jnp.concatenate([bias, sink_column], axis=-1)
        allowed = jnp.concatenate([allowed, jnp.ones((*allowed.shape[:2], 1), bool)], axis=-1)
    bias = None if bias is None else bias.astype(q.dtype)
    return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=allowed[:, None], scale=scale,
                                        implementation=None if implementation == "xla" else implementation)


def attention_implementation(platform: str, dtype, equal_head_dims: bool, long_prefill: bool) -> str:
    """"cudnn", "xla" (jax.nn.dot_product_attention), "tiled" or "reference": see attend."""
    if not long_prefill:
        return "reference"
    if platform == "gpu" and equal_head_dims and jnp.dtype(dtype).itemsize == 2:
        return "cudnn"
    if platform == "tpu" and equal_head_dims:  # dot_product_attention takes value heads of q's size only
        return "xla"
    return "tiled"


def _grouped(q, k, v, scale):
    """q [B,T,H,D] -> [B,Hkv,G,T,D] scaled; k, v [B,S,Hkv,D] -> [B,Hkv,S,D]."""
    b, t, h, d = q.shape
    hkv = k.shape[2]
    q = (q * scale).reshape(b, t, hkv, h // hkv, d).transpose(0, 2, 3, 1, 4)
    return q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)


def _grouped_bias(bias, hkv: int):
    """[B or 1, H, T, S] -> [B or 1, Hkv, G, T, S], the layout of _grouped's logits."""
    b, h, t, s = bias.shape
    return bias.astype(jnp.float32).reshape(b, hkv, h // hkv, t, s)


def _grouped_sinks(sinks, hkv: int):
    """[H] -> float32 [1, Hkv, G, 1, 1], broadcasting against _grouped's logits."""
    return sinks.astype(jnp.float32).reshape(1, hkv, -1, 1, 1)


def _ungrouped(out):
    """[B,Hkv,G,T,Dv] -> [B,T,H,Dv]."""
    b, hkv, g, t, dv = out.shape
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, hkv * g, dv)


_MASKED = float(jnp.finfo(jnp.float32).min)


def reference_attention(q, k, v, allowed, scale, bias=None, sinks=None):
    """Softmax attention over every key slot: q [B,T,H,D], k [B,S,Hkv,D], v [B,S,Hkv,Dv] -> [B,T,H,Dv] f32.
    A query allowed no key gets the mean of every value (all its logits are equal), or with sinks 0."""
    q, k, v = _grouped(q, k, v, scale)
    logits = jnp.einsum("bkgtd,bksd->bkgts", q, k, preferred_element_type=jnp.float32)
    if bias is not None:
        logits = logits + _grouped_bias(bias, k.shape[1])
    logits = jnp.where(allowed[:, None, None], logits, _MASKED)
    peak = logits.max(axis=-1, keepdims=True)
    if sinks is not None:
        sink = _grouped_sinks(sinks, k.shape[1])
        peak = jnp.maximum(peak, sink)
    probs = jnp.exp(logits - peak)
    total = probs.sum(axis=-1, keepdims=True)
    if sinks is not None:
        total = total + jnp.exp(sink - peak)
    out = jnp.einsum("bkgts,bksd->bkgtd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return _ungrouped(out / total)  # normalise [T, Dv], not [T, S]


def tiled_attention(q, k, v, allowed, scale, query_offset: int, block: int = _BLOCK, bias=None, sinks=None):
    """reference_attention in blocks of `block` queries x `block` keys (flash-attention style): each query
    block visits only the key blocks at or before its last slot (query i sits at slot query_offset + i;
    later slots are never allowed, causal by slot), with an online softmax (running max and sum), so no
    work is done on blocks the causal mask removes and each block's scores stay in cache. `allowed` masks
    inside the blocks that cross the causal diagonal, and inside a block wholly before it only where it
    removes a key there (padding, sliding windows, chunks): a run-time check per block, since the select
    costs a fifth of the attention's time on XLA:CPU (experiments/results/bench_forward_cpu.md). Sinks
    start each query's running max and sum (max = the sink, sum = 1). -> [B,T,H,Dv] f32."""
    q, k, v = _grouped(q, k, v, scale)
    t, s = q.shape[3], k.shape[2]
    bias = None if bias is None else _grouped_bias(bias, k.shape[1])

    def visit(carry, qb, kb, vb, bias_block, mask, masked: bool):
        """The online-softmax update of a query block qb by a key block kb, vb (its bias, its mask)."""
        peak, total, acc = carry
        logits = jnp.einsum("bkgtd,bksd->bkgts", qb, kb, preferred_element_type=jnp.float32)
        if bias_block is not None:
            logits = logits + bias_block
        if masked:
            logits = jnp.where(mask[:, None, None], logits, _MASKED)
        new_peak = jnp.maximum(peak, logits.max(axis=-1, keepdims=True))
        probs = jnp.exp(logits - new_peak)
        rescale = jnp.exp(peak - new_peak)
        total = total * rescale + probs.sum(axis=-1, keepdims=True)
        acc = acc * rescale + jnp.einsum("bkgts,bksd->bkgtd", probs.astype(v.dtype), vb,
                                         preferred_element_type=jnp.float32)
        return new_peak, total, acc

    outs = []
    for q0 in range(0, t, block):
        q1 = min(t, q0 + block)
        qb = q[:, :, :, q0:q1]
        top = (*q.shape[:3], q1 - q0, 1)
        if sinks is None:
            peak, total = jnp.full(top, _MASKED, jnp.float32), jnp.zeros(top, jnp.float32)
        else:
            peak, total = jnp.broadcast_to(_grouped_sinks(sinks, k.shape[1]), top), jnp.ones(top, jnp.float32)
        carry = peak, total, jnp.zeros((*top[:-1], v.shape[-1]), jnp.float32)
        for k0 in range(0, min(s, query_offset + q1), block):
            k1 = min(s, k0 + block, query_offset + q1)
            # the blocks go into the branches as operands, not closures (which pass the whole k and v)
            blocks = (qb, k[:, :, k0:k1], v[:, :, k0:k1], None if bias is None else bias[..., q0:q1, k0:k1],
                      allowed[:, q0:q1, k0:k1])
            if k1 - 1 <= query_offset + q0:  # every key at or before the block's first query: causal throughout
                carry = jax.lax.cond(jnp.all(blocks[-1]), lambda c, b: visit(c, *b, masked=False),
                                     lambda c, b: visit(c, *b, masked=True), carry, blocks)
            else:
                carry = visit(carry, *blocks, masked=True)
        outs.append(carry[2] / carry[1])
    return _ungrouped(jnp.concatenate(outs, axis=3) if len(outs) > 1 else outs[0])


def _static(index) -> int | None:
    """The cache index as a Python int where it is known at trace time (prefill), else None."""
    return index if isinstance(index, int) else None


def _write(buffer: jax.Array, update: jax.Array, index: jax.Array) -> jax.Array:
    return jax.lax.dynamic_update_slice_in_dim(buffer, update.astype(buffer.dtype), index, axis=1)


class Attention(nnx.Module):
    """Multi-head attention with GQA; OLMoE's q/k norm and qkv clipping; Qwen's qkv biases; Qwen3's and
    GLM-4.5's per-head q/k norm; GLM-4.5's partial rotary; GPT-OSS's sinks; Llama 4's rope-free layers (with
    temperature tuning) and weightless q/k norm after rope. `layer`: which layer it is (its kind, its rope)."""

    def __init__(self, config: ModelConfig, *, dtype, rngs: nnx.Rngs, layer: int = 0):
        c = config
        d, h, hkv, hd = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim
        self.q_proj = Dense(d, h * hd, bias=c.qkv_bias, dtype=dtype, rngs=rngs)
        self.k_proj = Dense(d, hkv * hd, bias=c.qkv_bias, dtype=dtype, rngs=rngs)
        self.v_proj = Dense(d, hkv * hd, bias=c.qkv_bias, dtype=dtype, rngs=rngs)
        self.o_proj = Dense(h * hd, d, bias=c.o_bias, dtype=dtype, rngs=rngs)
        # q/k norm over the whole projection (OLMoE) or over each head (Qwen3, GLM-4.5): same names, other shapes
        q_dim, k_dim = (hd, hd) if c.head_qk_norm else (h * hd, hkv * hd)
        self.q_norm = RMSNorm(q_dim, c.rms_norm_eps, dtype=dtype) if c.qk_norm or c.head_qk_norm else None
        self.k_norm = RMSNorm(k_dim, c.rms_norm_eps, dtype=dtype) if c.qk_norm or c.head_qk_norm else None
        self.sinks = nnx.Param(jnp.zeros((h,), dtype)) if c.attention_sinks else None
        self.config = config
        self.layer = layer

    def __call__(self, x: jax.Array, ctx: AttentionContext, layer_cache):
        """x [B, T, d] -> ([B, T, d], the layer's cache with the T new tokens written at ctx.index)."""
        c, cos, sin, index = self.config, ctx.cos, ctx.sin, ctx.index
        b, t, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if c.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if c.clip_qkv is not None:
            q, k, v = (jnp.clip(a, -c.clip_qkv, c.clip_qkv) for a in (q, k, v))
        q, k = q.reshape(b, t, c.num_heads, c.head_dim), k.reshape(b, t, c.num_kv_heads, c.head_dim)
        if c.head_qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if c.uses_rope(self.layer):
            q, k = _rope_heads(q, cos, sin, c), _rope_heads(k, cos, sin, c)
            if c.qk_l2_norm:
                q, k = rms_normalize(q, c.rms_norm_eps), rms_normalize(k, c.rms_norm_eps)
        elif c.attn_temperature_tuning:  # long contexts keep their attention sharp where no rope tells distance
            scales = jnp.log1p(jnp.floor((ctx.positions + 1.0) / c.floor_scale)) * c.attn_scale + 1.0
            q = (q * scales[:, :, None, None]).astype(q.dtype)
        v = v.reshape(b, t, c.num_kv_heads, c.head_dim)
        if layer_cache is not None:
            k, v = _write(layer_cache[0], k, index), _write(layer_cache[1], v, index)
            layer_cache = (k, v)
        allowed = layer_allowed(ctx, c.attention_kind(self.layer), c.sliding_window, c.attention_chunk_size)
        sinks = None if self.sinks is None else self.sinks[...]
        return self.o_proj(attend(q, k, v, allowed, c.attention_scale, _static(index), sinks=sinks)), layer_cache


def _rope_heads(x: jax.Array, cos: jax.Array, sin: jax.Array, c: ModelConfig) -> jax.Array:
    """Rope on each head's first rope_dim dims (all of them unless the family's rotary is partial)."""
    if c.rope_dim == x.shape[-1]:
        return apply_rope(x, cos, sin, c.rope.interleaved)
    return jnp.concatenate([apply_rope(x[..., :c.rope_dim], cos, sin, c.rope.interleaved), x[..., c.rope_dim:]],
                           axis=-1)


class LatentAttention(nnx.Module):
    """DeepSeek-V2 multi-head latent attention; the cache holds the compressed latent and the shared rope key."""

    def __init__(self, config: ModelConfig, *, dtype, rngs: nnx.Rngs, layer: int = 0):
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
        self.layer = layer

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
        allowed = layer_allowed(ctx, c.attention_kind(self.layer), c.sliding_window, c.attention_chunk_size)
        return self.o_proj(attend(q, k, v, allowed, c.attention_scale, _static(index))), layer_cache
