"""Generation: KV-cache decoding against recomputation without a cache, sampling, stop tokens, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import moejax
from moejax.generate import sample_next
from tests.tiny import tiny_config


@pytest.fixture(scope="module")
def model():
    # larger weights than the default init, so greedy choices are far from ties
    m = moejax.random_model(tiny_config(), seed=3)
    for block in m.moe_blocks():
        block.router[...] = block.router[...] * 20
    m.lm_head[...] = m.lm_head[...] * 20
    return m


PROMPTS = [[5, 9, 2], [7, 1, 4, 4, 8, 3, 9, 10, 11, 2, 6]]


def _greedy_without_cache(model, prompt, n):
    """Recompute the whole sequence for every new token. A fixed-length buffer (causal attention: the
    zeros after the last real token cannot affect it) keeps this to one compilation."""
    forward = nnx.jit(lambda m, t: m(t))
    tokens = np.zeros((1, len(prompt) + n), np.int32)
    tokens[0, :len(prompt)] = prompt
    for i in range(len(prompt), len(prompt) + n):
        tokens[0, i] = int(jnp.argmax(forward(model, jnp.asarray(tokens))[0, i - 1]))
    return tokens[0, len(prompt):].tolist()


def test_kv_cache_decoding_equals_recomputation(model):
    new = np.asarray(moejax.generate(model, PROMPTS, max_new_tokens=10))
    for i, p in enumerate(PROMPTS):
        assert new[i].tolist() == _greedy_without_cache(model, p, 10)


def test_array_prompt_and_exact_cache_size(model):
    prompt = np.asarray([PROMPTS[1], PROMPTS[1][::-1]], np.int32)
    expected = np.asarray(moejax.generate(model, prompt, max_new_tokens=5))
    # 11 prompt tokens + 5 new fit a 16-slot cache exactly, though the prompt bucket pads to 16
    exact = np.asarray(moejax.generate(model, prompt, max_new_tokens=5, cache_size=16))
    np.testing.assert_array_equal(exact, expected)


def test_stop_token_ends_a_row_and_pads_the_rest(model):
    greedy = np.asarray(moejax.generate(model, PROMPTS, max_new_tokens=8))
    stop = int(greedy[1, 2])
    first = int(np.argmax(greedy[1] == stop))  # first occurrence in row 1
    out = np.asarray(moejax.generate(model, PROMPTS, max_new_tokens=8, stop_tokens=[stop], pad_token_id=63))
    np.testing.assert_array_equal(out[1, :first + 1], greedy[1, :first + 1])
    assert (out[1, first + 1:] == 63).all()
    row0_stops = np.flatnonzero(greedy[0] == stop)
    end0 = row0_stops[0] + 1 if len(row0_stops) else 8
    np.testing.assert_array_equal(out[0, :end0], greedy[0, :end0])


def test_sampling_is_reproducible_and_key_dependent(model):
    a = moejax.generate(model, PROMPTS, max_new_tokens=12, temperature=1.5, key=jax.random.key(1))
    b = moejax.generate(model, PROMPTS, max_new_tokens=12, temperature=1.5, key=jax.random.key(1))
    c = moejax.generate(model, PROMPTS, max_new_tokens=12, temperature=1.5, key=jax.random.key(2))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_tiny_top_p_is_greedy(model):
    greedy = moejax.generate(model, PROMPTS, max_new_tokens=6)
    nucleus = moejax.generate(model, PROMPTS, max_new_tokens=6, temperature=1.0, top_p=1e-6, key=jax.random.key(0))
    np.testing.assert_array_equal(greedy, nucleus)


def test_sampling_distribution_matches_truncated_softmax():
    logits = jnp.log(jnp.asarray([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    n = 20000
    keys = jax.random.split(jax.random.key(0), n)
    draws = np.asarray(jax.vmap(lambda k: sample_next(logits, k, 1.0, 0.8))(keys))[:, 0]
    # top_p=0.8 keeps the smallest prefix reaching 0.8: {0.5, 0.2, 0.15}, renormalised
    expected = np.asarray([0.5, 0.2, 0.15, 0, 0]) / 0.85
    freq = np.bincount(draws, minlength=5) / n
    np.testing.assert_allclose(freq, expected, atol=0.015)


@pytest.mark.parametrize("kwargs, match", [
    (dict(cache_size=12), r"longer than the cache \(12 slots\)"),
    (dict(temperature=0.7), "needs an explicit PRNG key"),
    (dict(max_new_tokens=0), "max_new_tokens=0"),
    (dict(top_p=0.0), "top_p=0.0"),
    (dict(stop_tokens=[64]), "stop token 64 is outside the vocabulary"),
])
def test_bad_generation_arguments(model, kwargs, match):
    args = dict(max_new_tokens=4)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        moejax.generate(model, PROMPTS, **args)


def test_token_ids_outside_vocabulary(model):
    with pytest.raises(ValueError, match=r"token id 64 at position \(1, 0\) is outside the vocabulary \[0, 64\)"):
        model(jnp.asarray([[1, 2], [64, 3]]))
    with pytest.raises(ValueError, match=r"token id -1"):
        moejax.generate(model, [[1, 2], [-1]], max_new_tokens=2)
