"""Generation: one jitted prefill over left-padded prompts, then a jitted decode loop on a preallocated KV cache."""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moejax.models.transformer import CausalLM, KVCache, check_token_ids, init_cache

_PROMPT_BUCKET = 8  # prompts are left-padded to a multiple of this, so few prompt lengths compile


def pad_prompts(prompt, pad_id: int = 0, bucket: int = _PROMPT_BUCKET) -> tuple[np.ndarray, np.ndarray]:
    """int [B, T] array or list of token lists -> left-padded tokens [B, P] and a bool mask of real tokens."""
    if isinstance(prompt, (list, tuple)) and prompt and not np.isscalar(prompt[0]):
        rows = [np.asarray(p, dtype=np.int64).reshape(-1) for p in prompt]
    else:
        arr = np.asarray(prompt)
        if arr.ndim != 2:
            raise ValueError(f"prompt must be int [batch, seq] or a list of token lists; got shape {arr.shape}")
        rows = list(arr)
    if not rows or any(len(r) == 0 for r in rows):
        raise ValueError("every prompt needs at least one token")
    length = -(-max(len(r) for r in rows) // bucket) * bucket
    tokens = np.full((len(rows), length), pad_id, np.int32)
    mask = np.zeros((len(rows), length), bool)
    for i, r in enumerate(rows):
        tokens[i, length - len(r):] = r
        mask[i, length - len(r):] = True
    return tokens, mask


def generate(model: CausalLM, prompt, max_new_tokens: int = 16, *, key: jax.Array | None = None,
             temperature: float = 0.0, top_p: float = 1.0, stop_tokens: Sequence[int] | int | None = None,
             cache_size: int | None = None, pad_token_id: int | None = None) -> jax.Array:
    """Generate `max_new_tokens` tokens after each prompt -> int32 [B, max_new_tokens].

    Greedy by default (temperature 0). Sampling (temperature > 0, optionally nucleus top_p < 1) needs an
    explicit PRNG `key`. After a stop token a row's remaining outputs are `pad_token_id` (default: the
    config's pad id, else the first stop token, else 0).
    """
    config = model.config
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p} must be in (0, 1]")
    if temperature > 0 and key is None:
        raise ValueError("sampling (temperature > 0) needs an explicit PRNG key: generate(..., key=jax.random.key(0))")
    stops = () if stop_tokens is None else tuple(np.atleast_1d(stop_tokens).tolist())
    for s in stops:
        if not 0 <= s < config.vocab_size:
            raise ValueError(f"stop token {s} is outside the vocabulary [0, {config.vocab_size})")
    tokens, mask = pad_prompts(prompt)
    check_token_ids(jnp.where(mask, tokens, 0), config.vocab_size)
    real_lengths = mask.sum(axis=1)
    needed = tokens.shape[1] + max_new_tokens
    if cache_size is None:
        cache_size = needed
    elif int(real_lengths.max()) + max_new_tokens > cache_size:
        raise ValueError(f"prompt of {int(real_lengths.max())} tokens + max_new_tokens={max_new_tokens} is longer "
                         f"than the cache ({cache_size} slots)")
    elif needed > cache_size:  # the cache fits the tokens but not our bucket padding: trim the padding
        trim = needed - cache_size
        tokens, mask = tokens[:, trim:], mask[:, trim:]
    if pad_token_id is None:
        pad_token_id = config.pad_token_id if config.pad_token_id is not None else (stops[0] if stops else 0)
    if key is None:
        key = jax.random.key(0)
    graphdef, state = nnx.split(model)
    return _generate(graphdef, state, jnp.asarray(tokens), jnp.asarray(mask), key, max_new_tokens=max_new_tokens,
                     cache_size=cache_size, temperature=float(temperature), top_p=float(top_p), stops=stops,
                     pad_token_id=int(pad_token_id))


def sample_next(logits: jax.Array, key: jax.Array, temperature: float, top_p: float) -> jax.Array:
    """logits float32 [B, V] -> int32 [B]: argmax if temperature == 0, else temperature / nucleus sampling."""
    if temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_p < 1:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        # keep the smallest prefix whose mass reaches top_p (always at least the most likely token)
        before = jnp.cumsum(probs, axis=-1) - probs
        cutoff = jnp.min(jnp.where(before < top_p, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits >= cutoff, logits, -jnp.inf)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=(
    "max_new_tokens", "cache_size", "temperature", "top_p", "stops", "pad_token_id"))
def _generate(graphdef, state, tokens, mask, key, *, max_new_tokens, cache_size, temperature, top_p, stops,
              pad_token_id):
    model = nnx.merge(graphdef, state)
    batch = tokens.shape[0]
    cache = init_cache(model.config, batch, cache_size, model.dtype)
    out = model.forward(tokens, token_mask=mask, cache=cache)
    key, sub = jax.random.split(key)
    first = sample_next(out.logits[:, -1], sub, temperature, top_p)
    stop_ids = jnp.asarray(stops if stops else (-1,), jnp.int32)

    def is_stop(tok):
        return jnp.isin(tok, stop_ids) if stops else jnp.zeros(tok.shape, bool)

    generated = jnp.full((batch, max_new_tokens), pad_token_id, jnp.int32).at[:, 0].set(first)
    done = is_stop(first)

    def cond(carry):
        step, _, _, done, _, _ = carry
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        step, last, generated, done, cache, key = carry
        # finished rows still run (static shapes) but as padding: no cache slot, no expert slot
        out = model.forward(last[:, None], token_mask=~done[:, None], cache=cache, decode=True)
        key, sub = jax.random.split(key)
        nxt = sample_next(out.logits[:, -1], sub, temperature, top_p)
        nxt = jnp.where(done, pad_token_id, nxt)
        generated = jax.lax.dynamic_update_slice_in_dim(generated, nxt[:, None], step, axis=1)
        return step + 1, nxt, generated, done | is_stop(nxt), out.cache, key

    cache = out.cache._replace(index=jnp.asarray(out.cache.index, jnp.int32))  # static after prefill; a loop carry now
    carry = (jnp.ones((), jnp.int32), first, generated, done, cache, key)
    _, _, generated, _, _, _ = jax.lax.while_loop(cond, body, carry)
    return generated
