"""Perplexity against a brute-force computation, one unpadded sequence at a time."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

import moejax
from moejax import evaluation
from tests.tiny import tiny_config


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_perplexity_matches_brute_force():
    model = moejax.random_model(tiny_config(), seed=4)
    rs = np.random.RandomState(0)
    sequences = [rs.randint(0, 64, size=n).tolist() for n in (2, 9, 17, 5, 30)]
    nll, count = 0.0, 0
    for s in sequences:
        logprobs = _log_softmax(np.asarray(model(jnp.asarray([s])), np.float64)[0])
        nll -= sum(logprobs[i, s[i + 1]] for i in range(len(s) - 1))
        count += len(s) - 1
    expected = math.exp(nll / count)
    assert math.isclose(evaluation.perplexity(model, sequences, batch_size=3), expected, rel_tol=1e-4)
    assert math.isclose(evaluation.perplexity(model, sequences, batch_size=1), expected, rel_tol=1e-4)


def test_perplexity_bad_input():
    model = moejax.random_model(tiny_config(), seed=4)
    with pytest.raises(ValueError, match="two or more tokens"):
        evaluation.perplexity(model, [[1]])
    with pytest.raises(ValueError, match="batch_size=0"):
        evaluation.perplexity(model, [[1, 2]], batch_size=0)
