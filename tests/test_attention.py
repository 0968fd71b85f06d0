"""Prefill attention: the tiled (flash-style) attention and jax.nn.dot_product_attention equal the reference
softmax attention to float32 tolerance on every query that may attend to a key (causal by slot, left
padding, sliding windows, a cache already holding tokens, GQA / MQA, value heads of another size as in
latent attention), and attend picks the implementation for each backend in one place."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.models import attention


def case(seed, *, b=2, t=50, past=0, h=4, hkv=2, d=8, dv=8, window=None, pad=(0, 7)):
    """q, k, v, allowed as a prefill of t tokens into a cache holding `past` earlier slots builds them:
    query i at slot past + i sees slots <= its own, real ones only (row r's first pad[r] are padding),
    within `window` positions."""
    rng = np.random.default_rng(seed)
    s = past + t
    q = jnp.asarray(rng.normal(size=(b, t, h, d)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(b, s, hkv, d)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(b, s, hkv, dv)), jnp.float32)
    real = np.ones((b, s), bool)
    for r, p in enumerate(pad[:b]):
        real[r, past:past + p] = False
    positions = np.cumsum(real, axis=1) - 1
    slots = np.arange(s)
    allowed = real[:, None, :] & (slots[None, None, :] <= (past + np.arange(t))[None, :, None])
    if window:
        allowed &= positions[:, past:, None] - positions[:, None, :] < window
    return q, k, v, jnp.asarray(allowed)


def assert_equal_where_attending(out, ref, allowed):
    seen = np.asarray(allowed.any(axis=-1))  # [B, T]: queries with at least one key
    np.testing.assert_allclose(np.asarray(out)[seen], np.asarray(ref)[seen], rtol=1e-5, atol=1e-5)


CASES = {
    "causal with left padding": dict(),
    "sliding window": dict(window=9),
    "cache already holding tokens": dict(past=13, t=37),
    "multi-query": dict(hkv=1),
    "one kv head per query head": dict(hkv=4),
    "value heads of another size (latent attention)": dict(d=12, dv=6),
    "a length that is a multiple of the block": dict(t=64, pad=(0, 0)),
}


@pytest.mark.parametrize("block", [16, 128])
@pytest.mark.parametrize("name", CASES)
def test_tiled_attention_equals_the_reference(name, block):
    kwargs = CASES[name]
    q, k, v, allowed = case(0, **kwargs)
    ref = attention.reference_attention(q, k, v, allowed, 0.3)
    out = attention.tiled_attention(q, k, v, allowed, 0.3, kwargs.get("past", 0), block)
    assert_equal_where_attending(out, ref, allowed)


@pytest.mark.parametrize("name", [n for n in CASES if "another size" not in n])
def test_dot_product_attention_path_equals_the_reference(name):
    # the TPU path ("xla"); cuDNN's needs a GPU and is not run here
    q, k, v, allowed = case(1, **CASES[name])
    ref = attention.reference_attention(q, k, v, allowed, 0.3)
    assert_equal_where_attending(attention.fused_attention(q, k, v, allowed, 0.3, "xla"), ref, allowed)


def test_attend_tiles_a_long_prefill_and_matches_the_reference_attention():
    q, k, v, allowed = case(2, t=3 * attention._BLOCK + 5, past=4)
    out = jax.jit(lambda *a: attention.attend(*a, 0.3, 4))(q, k, v, allowed)
    ref = attention.reference_attention(q, k, v, allowed, 0.3).reshape(out.shape)
    assert_equal_where_attending(out.reshape(ref.shape[:2] + (q.shape[2], -1)), ref.reshape(
        ref.shape[:2] + (q.shape[2], -1)), allowed)


@pytest.mark.parametrize("platform, dtype, equal_dims, long_prefill, expected", [
    ("cpu", jnp.float32, True, True, "tiled"),
    ("cpu", jnp.bfloat16, True, True, "tiled"),
    ("gpu", jnp.bfloat16, True, True, "cudnn"),
    ("gpu", jnp.float16, True, True, "cudnn"),
    ("gpu", jnp.float32, True, True, "tiled"),  # cuDNN's kernel takes 2-byte floats only
    ("gpu", jnp.bfloat16, False, True, "tiled"),  # nor value heads of another size
    ("tpu", jnp.float32, True, True, "xla"),
    ("tpu", jnp.bfloat16, False, True, "tiled"),
    ("gpu", jnp.bfloat16, True, False, "reference"),  # decode steps and short calls
    ("cpu", jnp.float32, True, False, "reference"),
])
def test_one_place_picks_the_attention_of_each_backend(platform, dtype, equal_dims, long_prefill, expected):
    assert attention.attention_implementation(platform, dtype, equal_dims, long_prefill) == expected


# GPT-OSS's attention sinks: a learned logit per head in every softmax's denominator
def _sinks(h=4, seed=5):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(h,)) * 2, jnp.float32)


def test_reference_attention_with_sinks_is_the_softmax_with_a_dropped_sink_column():
    """numpy, query by query and head by head: softmax over [its allowed logits, the head's sink], the sink's
    share dropped (transformers' GPT-OSS eager attention)."""
    q, k, v, allowed = case(3, t=9, hkv=2)
    sinks = _sinks()
    out = np.asarray(attention.reference_attention(q, k, v, allowed, 0.3, sinks=sinks))
    qn, kn, vn, an, sn = (np.asarray(a, np.float64) for a in (q, k, v, allowed, sinks))
    group = q.shape[2] // k.shape[2]
    for b, t, h in np.ndindex(q.shape[0], q.shape[1], q.shape[2]):
        keys = np.flatnonzero(an[b, t])
        logits = np.concatenate([0.3 * kn[b, keys, h // group] @ qn[b, t, h], [sn[h]]])
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        np.testing.assert_allclose(out[b, t, h], probs[:-1] @ vn[b, keys, h // group], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", CASES)
def test_tiled_attention_with_sinks_equals_the_reference(name):
    kwargs = CASES[name]
    q, k, v, allowed = case(4, **kwargs)
    sinks = _sinks(q.shape[2])
    ref = attention.reference_attention(q, k, v, allowed, 0.3, sinks=sinks)
    out = attention.tiled_attention(q, k, v, allowed, 0.3, kwargs.get("past", 0), 16, sinks=sinks)
    assert_equal_where_attending(out, ref, allowed)


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("name", [n for n in CASES if "another size" not in n])
def test_dot_product_attention_path_with_sinks_equals_the_reference(name, with_bias):
    q, k, v, allowed = case(6, **CASES[name])
    sinks = _sinks(q.shape[2])
    bias = jnp.asarray(np.random.default_rng(7).normal(size=(1, q.shape[2], *allowed.shape[1:])), jnp.float32) \
        if with_bias else None
    ref = attention.reference_attention(q, k, v, allowed, 0.3, bias, sinks)
    assert_equal_where_attending(attention.fused_attention(q, k, v, allowed, 0.3, "xla", bias, sinks), ref, allowed)


def test_attend_passes_the_sinks_to_every_path():
    q, k, v, allowed = case(8, t=attention._BLOCK + 5, past=4)
    sinks = _sinks()
    long = jax.jit(lambda *a: attention.attend(*a, 0.3, 4, sinks=sinks))(q, k, v, allowed)  # tiled
    step = attention.attend(q, k, v, allowed, 0.3, None, sinks=sinks)  # the reference (a decode-style call)
    ref = attention.reference_attention(q, k, v, allowed, 0.3, sinks=sinks)
    for out in (long, step):
        assert_equal_where_attending(out.reshape(ref.shape), ref, allowed)
    assert np.abs(np.asarray(ref) - np.asarray(attention.reference_attention(q, k, v, allowed, 0.3))).max() > 1e-2


@pytest.mark.parametrize("kind, size", [("sliding_attention", 3), ("chunked_attention", 4), ("full_attention", None)])
def test_each_layer_kind_narrows_the_causal_mask_by_position(kind, size):
    """A left-padded row and a cache holding earlier tokens: the mask equals its definition on positions."""
    token_mask = jnp.asarray([[True] * 6, [False, False, True, True, True, True]])
    cache = attention.KVCache((), jnp.zeros((2, 10), bool).at[:, :3].set(True),
                              jnp.zeros((2, 10), jnp.int32).at[:, :3].set(jnp.arange(3)), 3)
    ctx = attention.attention_context(token_mask, None, cache, ((), 1.0), None)
    mask = np.asarray(attention.layer_allowed(ctx, kind, size, size))
    positions, keys = np.asarray(ctx.positions), np.asarray(ctx.key_positions)
    for b, t, s in np.ndindex(mask.shape):
        causal = bool(ctx.allowed[b, t, s])
        within = {"sliding_attention": positions[b, t] - keys[b, s] < 3,
                  "chunked_attention": positions[b, t] // 4 == keys[b, s] // 4, "full_attention": True}[kind]
        assert mask[b, t, s] == (causal and within), (b, t, s)
    assert mask.sum() < np.asarray(ctx.allowed).sum() or kind == "full_attention"
