"""Generation: KV-cache decoding against recomputation without a cache, sampling, stop tokens and the eos
default, and the checks of every entry point's token ids and sampling arguments."""

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


# ---------------------------------------------------------------------------------------------------------
# Token ids: one check at every entry point, before any cast


def _entry_points(model):
    """Every way token ids enter a model: the forward, the decode loop, buffered decoding, the padding."""
    from moejax import buffering
    from moejax.generate import pad_prompts

    return {"model": lambda t: model(t), "forward": lambda t: model.forward(t),
            "generate": lambda t: moejax.generate(model, t, max_new_tokens=2),
            "buffering.generate": lambda t: buffering.generate(model, t, 2, cache_size=2),
            "pad_prompts": lambda t: pad_prompts(t, vocab_size=model.config.vocab_size)}


BAD_TOKENS = [
    ([[5.7, 6.2]], r"must be integer token ids; got dtype float64 \(value 5\.7 at position \(0, 0\)\)"),
    (np.asarray([[1, 2], [3, 4.5]]), r"got dtype float64 \(value 1\.0 at position \(0, 0\)\)"),
    (np.asarray([[3, 2**32 + 5]], np.int64), r"token id 4294967301 at position \(0, 1\) is outside the vocabulary"),
    ([[1, 2**70]], r"token id 1180591620717411303424 at position \(0, 1\) is outside the vocabulary"),
    (np.asarray([[1, 200]], np.uint8), r"token id 200 at position \(0, 1\) is outside the vocabulary \[0, 64\)"),
    (np.asarray([[True, False]]), r"must be integer token ids; got dtype bool"),
    ([["a", "b"]], r"must be integer token ids; got dtype <U1 \(value 'a'"),
    ([[1, 2], [3, -1]], r"token id -1 at position \(1, 1\)"),
]


@pytest.mark.parametrize("entry", ["model", "forward", "generate", "buffering.generate", "pad_prompts"])
@pytest.mark.parametrize("tokens, match", BAD_TOKENS)
def test_bad_token_ids_are_refused_at_every_entry_point(model, entry, tokens, match):
    with pytest.raises(ValueError, match=match):
        _entry_points(model)[entry](tokens)


@pytest.mark.parametrize("entry", ["generate", "buffering.generate", "pad_prompts"])
def test_prompts_of_the_wrong_rank_are_refused_not_flattened(model, entry):
    with pytest.raises(ValueError, match=r"prompt 0 must be int \[seq\] \(rank 1\); got shape \(1, 2\)"):
        _entry_points(model)[entry]([[[1, 2]], [3]])
    with pytest.raises(ValueError, match=r"must be int \[batch, seq\] \(rank 2\); got shape \(3,\)"):
        _entry_points(model)[entry]([1, 2, 3])
    with pytest.raises(ValueError, match=r"prompt 1 has none"):
        _entry_points(model)[entry]([[1, 2], []])


def test_model_refuses_tokens_of_the_wrong_rank(model):
    with pytest.raises(ValueError, match=r"tokens must be int \[batch, seq\] \(rank 2\); got shape \(1, 2, 2\)"):
        model(np.zeros((1, 2, 2), np.int32))


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.uint16, np.int64, np.uint64])
def test_every_integer_dtype_is_read_by_its_value(model, dtype):
    tokens = np.asarray([[5, 9, 2], [7, 1, 4]])
    np.testing.assert_array_equal(np.asarray(model(tokens.astype(dtype))), np.asarray(model(tokens)))
    np.testing.assert_array_equal(np.asarray(moejax.generate(model, tokens.astype(dtype), 3)),
                                  np.asarray(moejax.generate(model, tokens, 3)))


def test_uint8_ids_with_a_vocabulary_past_255_are_not_refused():
    """The check compares in the ids' dtype only where the vocabulary size fits in it."""
    big = moejax.random_model(tiny_config(vocab_size=300), seed=0)
    tokens = np.asarray([[5, 250, 2]], np.uint8)
    np.testing.assert_array_equal(np.asarray(big(tokens)), np.asarray(big(tokens.astype(np.int32))))
    moejax.generate(big, tokens, 2)


def test_pad_prompts_without_a_vocabulary_checks_int32s_range():
    from moejax.generate import pad_prompts

    with pytest.raises(ValueError, match=r"token id 4294967301 at position \(1, 0\) is outside int32's range"):
        pad_prompts([[1], np.asarray([2**32 + 5], np.int64)])
    tokens, mask = pad_prompts(np.asarray([[3, 4]], np.uint64), bucket=4)
    assert tokens.dtype == np.int32 and tokens.tolist() == [[0, 0, 3, 4]] and mask.tolist() == [[0, 0, 1, 1]]


@pytest.mark.parametrize("mask, match", [
    (np.ones((2, 3), bool), r"token_mask has shape \(2, 3\); the tokens have shape \(2, 2\)"),
    (np.asarray([[1, 2], [1, 1]]), r"token_mask must be bool \(or integers 0 / 1\); got dtype int64, value 2 at "
                                   r"position \(0, 1\)"),
    (np.asarray([[1.0, 1.0], [1.0, 0.5]]), r"got dtype float64, value 0\.5 at position \(1, 1\)"),
])
def test_bad_token_masks_are_refused(model, mask, match):
    with pytest.raises(ValueError, match=match):
        model(np.asarray([[1, 2], [3, 4]]), token_mask=mask)


def test_integer_token_mask_is_read_as_hugging_faces_attention_mask(model):
    tokens = np.asarray([[0, 1, 2], [3, 4, 5]])
    mask = np.asarray([[0, 1, 1], [1, 1, 1]])
    np.testing.assert_array_equal(np.asarray(model(tokens, token_mask=mask)),
                                  np.asarray(model(tokens, token_mask=mask.astype(bool))))


# ---------------------------------------------------------------------------------------------------------
# Sampling arguments: one check (moejax.generate.decoding) for every generate


BAD_SAMPLING = [
    (dict(temperature=float("nan")), r"temperature=nan must be >= 0"),
    (dict(temperature=float("inf"), key=jax.random.key(0)), r"temperature=inf must be >= 0 and finite"),
    (dict(temperature="0.5"), r"temperature='0.5' must be >= 0"),
    (dict(temperature=-1.0, key=jax.random.key(0)), r"temperature=-1\.0 must be >= 0"),
    (dict(top_p=float("nan")), r"top_p=nan must be in \(0, 1\]"),
    (dict(top_p=5), r"top_p=5 must be in \(0, 1\]"),
    (dict(max_new_tokens=2.5), r"max_new_tokens=2\.5 must be an integer >= 1"),
    (dict(max_new_tokens=True), r"max_new_tokens=True must be an integer >= 1"),
    (dict(max_new_tokens="3"), r"max_new_tokens='3' must be an integer >= 1"),
    (dict(stop_tokens=[2.5]), r"stop_tokens=\[2\.5\] must be a token id or a sequence of token ids"),
    (dict(stop_tokens=True), r"stop_tokens=True must be a token id"),
    (dict(stop_tokens=[64]), r"stop token 64 is outside the vocabulary \[0, 64\)"),
    (dict(stop_tokens=-1), r"stop token -1 is outside the vocabulary"),
    (dict(temperature=1.0, key=3), r"key=3 must be a PRNG key"),
    (dict(pad_token_id=1.5), r"pad_token_id=1\.5 must be an integer"),
]


@pytest.mark.parametrize("entry", ["generate", "buffering.generate"])
@pytest.mark.parametrize("kwargs, match", BAD_SAMPLING)
def test_bad_sampling_arguments_are_refused_by_every_generate(model, entry, kwargs, match):
    from moejax import buffering

    args = {"max_new_tokens": 2, **kwargs}
    run = {"generate": lambda: moejax.generate(model, PROMPTS, **args),
           "buffering.generate": lambda: buffering.generate(model, PROMPTS, cache_size=2, **args)}[entry]
    with pytest.raises(ValueError, match=match):
        run()


@pytest.mark.parametrize("kwargs, match", [(k, m) for k, m in BAD_SAMPLING if set(k) == {"stop_tokens"}])
def test_decode_loads_checks_its_stop_tokens_as_generate_does(model, kwargs, match):
    from moejax import evaluation

    with pytest.raises(ValueError, match=match):
        evaluation.decode_loads(model, PROMPTS, 2, **kwargs)


def test_bad_cache_size_is_refused(model):
    with pytest.raises(ValueError, match=r"cache_size=20\.5 must be an integer >= 1"):
        moejax.generate(model, PROMPTS, 2, cache_size=20.5)


def test_a_raw_prng_key_is_accepted(model):
    raw = moejax.generate(model, PROMPTS, 4, temperature=1.0, key=jax.random.PRNGKey(1))
    assert np.asarray(raw).shape == (2, 4)


# ---------------------------------------------------------------------------------------------------------
# The end-of-sequence default, as transformers generates


@pytest.fixture(scope="module")
def greedy(model):
    return np.asarray(moejax.generate(model, PROMPTS, max_new_tokens=8))


def _with_config(model, **changes):
    """The same parameters under a config with other generation fields (eos, pad, max positions)."""
    import dataclasses

    clone = nnx.clone(model)
    clone.config = dataclasses.replace(model.config, **changes)
    return clone


def test_generate_stops_at_the_checkpoints_eos_by_default(model, greedy):
    from moejax import buffering

    eos = int(greedy[1, 2])
    first = int(np.argmax(greedy[1] == eos))
    with_eos = _with_config(model, eos_token_id=eos, pad_token_id=None)
    out = np.asarray(moejax.generate(with_eos, PROMPTS, max_new_tokens=8))
    np.testing.assert_array_equal(out[1, :first + 1], greedy[1, :first + 1])
    assert (out[1, first + 1:] == eos).all()  # no pad id in the config: padded with the (first) eos
    buffered = buffering.generate(with_eos, PROMPTS, 8, cache_size=2).tokens
    np.testing.assert_array_equal(buffered, out)
    # stop_tokens=() turns it off; explicit stop tokens replace it
    np.testing.assert_array_equal(np.asarray(moejax.generate(with_eos, PROMPTS, max_new_tokens=8, stop_tokens=())),
                                  greedy)
    np.testing.assert_array_equal(buffering.generate(with_eos, PROMPTS, 8, cache_size=2, stop_tokens=()).tokens, greedy)


def test_a_list_of_eos_ids_and_ids_outside_the_vocabulary(model, greedy):
    eos = int(greedy[0, 1])
    out = np.asarray(moejax.generate(_with_config(model, eos_token_id=(1000, eos), pad_token_id=63), PROMPTS, 8))
    first = int(np.argmax(greedy[0] == eos))
    assert (out[0, first + 1:] == 63).all()
    # an eos id the vocabulary cannot produce stops nothing (and is no error: the checkpoint is valid)
    np.testing.assert_array_equal(np.asarray(moejax.generate(_with_config(model, eos_token_id=1000), PROMPTS, 8)),
                                  greedy)


# ---------------------------------------------------------------------------------------------------------
# Positions past max_position_embeddings: every rope scheme computes them, so a warning, not an error


def test_positions_past_max_position_embeddings_warn(model):
    short = _with_config(model, max_position_embeddings=12)
    with pytest.warns(UserWarning, match=r"a sequence of 13 positions runs past the checkpoint's "
                                         r"max_position_embeddings=12 \(default rope\)"):
        short(np.zeros((1, 13), np.int32))
    with pytest.warns(UserWarning, match=r"sequence of 14 positions"):  # 11-token prompt, 3 of 4 new fed back
        moejax.generate(short, PROMPTS, max_new_tokens=4)
    with pytest.warns(UserWarning, match=r"sequence of 13 positions"):
        short(np.zeros((1, 13), np.int32), token_mask=np.ones((1, 13), bool))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        short(np.zeros((1, 14), np.int32), token_mask=np.arange(14)[None] >= 2)  # 12 real tokens: positions 0..11
        moejax.generate(short, PROMPTS, max_new_tokens=2)  # 11 + 1 positions
        np.testing.assert_array_equal(np.asarray(moejax.generate(short, PROMPTS, max_new_tokens=2)),
                                      np.asarray(moejax.generate(model, PROMPTS, max_new_tokens=2)))


def test_split_experts_generate_the_same_tokens(model):
    split = moejax.with_expert_storage(model, "split")
    np.testing.assert_array_equal(np.asarray(moejax.generate(split, PROMPTS, max_new_tokens=8)),
                                  np.asarray(moejax.generate(model, PROMPTS, max_new_tokens=8)))
