"""The decoder-only MoE transformer (Flax NNX) behind every supported family.

Modules only hold parameters; the math is plain jnp or lives in routing / capacity / dispatch / kernels.
Families differ only in ModelConfig values: GQA or multi-head latent attention, q/k norm, biases, which
layers are MoE, shared experts, router flavour.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from moejax import capacity, dispatch, kernels, parallel, routing
from moejax.config import ACTIVATIONS, ModelConfig
from moejax.models.rope import apply_rope, inverse_frequencies, rope_angles

_INIT = jax.nn.initializers.normal(0.02)


def _param(rngs: nnx.Rngs, shape, dtype) -> nnx.Param:
    return nnx.Param(_INIT(rngs.params(), shape, dtype))


class Dense(nnx.Module):
    """y = x @ kernel (+ bias); kernel [in, out] (HF stores the transpose)."""

    def __init__(self, din: int, dout: int, *, bias: bool = False, dtype=jnp.float32, rngs: nnx.Rngs):
        self.kernel = _param(rngs, (din, dout), dtype)
        self.bias = nnx.Param(jnp.zeros((dout,), dtype)) if bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = x @ self.kernel[...]
        return y + self.bias[...] if self.bias is not None else y


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, *, dtype=jnp.float32):
        self.weight = nnx.Param(jnp.ones((dim,), dtype))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return self.weight[...] * xf.astype(x.dtype)


class MLP(nnx.Module):
    """Dense gated FFN (SwiGLU for silu): dense layers and shared experts."""

    def __init__(self, dim: int, hidden: int, act: str, *, dtype, rngs: nnx.Rngs):
        self.gate_proj = Dense(dim, hidden, dtype=dtype, rngs=rngs)
        self.up_proj = Dense(dim, hidden, dtype=dtype, rngs=rngs)
        self.down_proj = Dense(hidden, dim, dtype=dtype, rngs=rngs)
        self.act = act

    def __call__(self, x: jax.Array) -> jax.Array:
        act = kernels.ACTIVATIONS[ACTIVATIONS[self.act]]
        return self.down_proj(act(self.gate_proj(x)) * self.up_proj(x))


# ---------------------------------------------------------------------------------------------------------
# KV cache and attention


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

    def __call__(self, x, cos, sin, allowed, layer_cache, index):
        c = self.config
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
        return self.o_proj(attend(q, k, v, allowed, c.attention_scale, _static(index))), layer_cache


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

    def __call__(self, x, cos, sin, allowed, layer_cache, index):
        c = self.config
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
        return self.o_proj(attend(q, k, v, allowed, c.attention_scale, _static(index))), layer_cache


# ---------------------------------------------------------------------------------------------------------
# The MoE block: route -> policy -> dispatch -> experts -> combine (+ shared experts)


class MoEBlock(nnx.Module):
    def __init__(self, config: ModelConfig, policy: capacity.MoEPolicy, layer: int, *, dtype, rngs: nnx.Rngs):
        c = config
        e, d, f = c.num_experts, c.hidden_size, c.moe_intermediate_size
        self.router = _param(rngs, (d, e), dtype)
        self.w_gate = _param(rngs, (e, d, f), dtype)
        self.w_up = _param(rngs, (e, d, f), dtype)
        self.w_down = _param(rngs, (e, f, d), dtype)
        self.shared = (MLP(d, c.shared_expert_intermediate_size, c.hidden_act, dtype=dtype, rngs=rngs)
                       if c.shared_expert_intermediate_size else None)
        self.shared_gate = _param(rngs, (d, 1), dtype) if c.shared_expert_gate else None
        self.config = config
        self.policy = policy
        self.layer = layer
        # which grouped_ffn implementation the experts step uses ("auto": the fastest for the backend;
        # training sets a differentiable one)
        self.implementation = "auto"
        self.parallel = None  # a parallel.ExpertParallel: run the experts sharded over a mesh

    def route(self, x: jax.Array, token_mask: jax.Array, decode: bool) -> routing.Routing:
        """Router and policy for x [N, d]; padding tokens (token_mask False) take no expert slot."""
        c = self.config
        logits = x.astype(jnp.float32) @ self.router[...].astype(jnp.float32)
        r = routing.route(logits, c.num_experts_per_tok, norm_topk_prob=c.norm_topk_prob,
                          topk_method=c.topk_method, n_group=c.n_group, topk_group=c.topk_group,
                          routed_scaling_factor=c.routed_scaling_factor, token_mask=token_mask)
        key = jax.random.key(self.layer) if self.policy.drop == "random" else None
        return capacity.apply_policy(r, self.policy, num_tokens=token_mask.sum(), decode=decode, key=key)

    def __call__(self, x: jax.Array, token_mask: jax.Array, decode: bool = False):
        """x [N, d], token_mask bool [N] -> ([N, d], Routing of the pairs computed, needed dispatch bucket)."""
        r = self.route(x, token_mask, decode)
        activation = ACTIVATIONS[self.config.hidden_act]
        needed = jnp.zeros((), jnp.int32)
        if self.parallel is None:
            sent = dispatch.dispatch(x, r)
            expert_out = kernels.grouped_ffn(sent.rows, sent.group_sizes, self.w_gate[...], self.w_up[...],
                                             self.w_down[...], activation=activation,
                                             implementation=self.implementation)
            out = dispatch.combine(expert_out, sent, r)
        else:
            result = parallel.expert_parallel_ffn(x, r, self.w_gate[...], self.w_up[...], self.w_down[...],
                                                  self.parallel, activation)
            out, needed, r = result.out, result.needed_bucket, r._replace(keep=result.kept)
        if self.shared is not None:
            shared = self.shared(x)
            if self.shared_gate is not None:
                shared = jax.nn.sigmoid(x @ self.shared_gate[...]) * shared
            out = out + shared
        return out, r, needed


class DecoderLayer(nnx.Module):
    def __init__(self, config: ModelConfig, layer: int, policy: capacity.MoEPolicy, *, dtype, rngs: nnx.Rngs):
        c = config
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, dtype=dtype)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, dtype=dtype)
        attention = LatentAttention if c.is_mla else Attention
        self.self_attn = attention(c, dtype=dtype, rngs=rngs)
        if c.moe_layers[layer]:
            self.mlp = MoEBlock(c, policy, layer, dtype=dtype, rngs=rngs)
        else:
            self.mlp = MLP(c.hidden_size, c.intermediate_size, c.hidden_act, dtype=dtype, rngs=rngs)

    def __call__(self, x, cos, sin, allowed, token_mask, layer_cache, index, decode):
        attn_out, layer_cache = self.self_attn(self.input_layernorm(x), cos, sin, allowed, layer_cache, index)
        x = x + attn_out
        h = self.post_attention_layernorm(x)
        r, needed = None, jnp.zeros((), jnp.int32)
        if isinstance(self.mlp, MoEBlock):
            b, t, d = h.shape
            out, r, needed = self.mlp(h.reshape(b * t, d), token_mask.reshape(b * t), decode)
            out = out.reshape(b, t, d)
        else:
            out = self.mlp(h)
        return x + out, layer_cache, r, needed


class ForwardOutput(NamedTuple):
    logits: jax.Array  # float32 [B, T, vocab]
    cache: KVCache | None
    routings: tuple  # per layer: Routing for MoE layers (keep: the pairs computed), None for dense ones
    needed_bucket: jax.Array  # int32: expert-parallel dynamic gating's largest buffer count (0 on one device)


class CausalLM(nnx.Module):
    """Decoder-only MoE language model. `model(tokens)` -> float32 logits [B, T, vocab]."""

    def __init__(self, config: ModelConfig, *, dtype=jnp.float32, policy: capacity.MoEPolicy | None = None,
                 rngs: nnx.Rngs):
        c = config
        policy = policy or capacity.MoEPolicy()
        self.config = config
        self.dtype = jnp.dtype(dtype)
        self.embed_tokens = _param(rngs, (c.vocab_size, c.hidden_size), dtype)
        self.layers = nnx.List([DecoderLayer(c, i, policy, dtype=dtype, rngs=rngs) for i in range(c.num_layers)])
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps, dtype=dtype)
        self.lm_head = None if c.tie_word_embeddings else _param(rngs, (c.hidden_size, c.vocab_size), dtype)
        inv_freq, attention_factor = inverse_frequencies(c.rope, c.rope_dim, c.max_position_embeddings)
        self._rope = (tuple(inv_freq.tolist()), attention_factor)  # static: plain Python numbers

    def moe_blocks(self) -> list[MoEBlock]:
        return [layer.mlp for layer in self.layers if isinstance(layer.mlp, MoEBlock)]

    def __call__(self, tokens: jax.Array, token_mask: jax.Array | None = None) -> jax.Array:
        """Compiled once per shape: split into (static graph, arrays) and run the jitted forward."""
        check_token_ids(tokens, self.config.vocab_size)
        graphdef, state = nnx.split(self)
        return _jitted_logits(graphdef, state, jnp.asarray(tokens), token_mask)

    def forward(self, tokens: jax.Array, *, token_mask: jax.Array | None = None,
                positions: jax.Array | None = None, cache: KVCache | None = None,
                decode: bool = False) -> ForwardOutput:
        """tokens int [B, T]. token_mask bool [B, T] marks real tokens (False: padding, which attends to
        nothing useful, is attended by nothing and takes no expert slot). positions default to the count of
        real tokens before each one (plus those already in the cache). With a cache, the T new tokens are
        written at slots [cache.index, cache.index + T) and attend to every valid earlier slot."""
        c = self.config
        check_token_ids(tokens, c.vocab_size)
        b, t = tokens.shape
        if token_mask is None:
            token_mask = jnp.ones((b, t), bool)
        token_mask = token_mask.astype(bool)
        if positions is None:
            start = 0 if cache is None else cache.mask.sum(axis=1, keepdims=True)
            positions = start + jnp.cumsum(token_mask, axis=1) - 1
        positions = jnp.maximum(positions, 0).astype(jnp.int32)
        inv_freq, attention_factor = self._rope
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
        if c.sliding_window:
            allowed &= positions[:, :, None] - key_positions[:, None, :] < c.sliding_window

        x = self.embed_tokens[...][tokens]
        new_layers, routings, needed = [], [], jnp.zeros((), jnp.int32)
        for i, layer in enumerate(self.layers):
            layer_cache = None if cache is None else cache.layers[i]
            x, layer_cache, r, layer_needed = layer(x, cos, sin, allowed, token_mask, layer_cache, index, decode)
            new_layers.append(layer_cache)
            routings.append(r)
            needed = jnp.maximum(needed, layer_needed)
        x = self.norm(x)
        head = self.embed_tokens[...].T if self.lm_head is None else self.lm_head[...]
        logits = jnp.einsum("btd,dv->btv", x, head, preferred_element_type=jnp.float32)
        new_cache = None
        if cache is not None:
            new_cache = KVCache(tuple(new_layers), key_mask, key_positions, index + t)
        return ForwardOutput(logits, new_cache, tuple(routings), needed)


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
