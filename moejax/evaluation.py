"""Quality: perplexity over token sequences, batched and padded correctly (padding excluded everywhere)."""

from __future__ import annotations

import functools
import math
from typing import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moejax.generate import pad_prompts
from moejax.models.transformer import CausalLM


@functools.partial(jax.jit, static_argnums=0)
def _token_log_likelihoods(graphdef, state, tokens, mask):
    """Sum of log p(token | prefix) over real next tokens, and their count, for one padded batch."""
    logits = nnx.merge(graphdef, state).forward(tokens, token_mask=mask).logits
    logprobs = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    target = tokens[:, 1:]
    picked = jnp.take_along_axis(logprobs, target[..., None], axis=-1)[..., 0]
    counted = mask[:, 1:] & mask[:, :-1]
    return jnp.where(counted, picked, 0.0).sum(), counted.sum()


def perplexity(model: CausalLM, sequences: Iterable[Sequence[int]], batch_size: int = 8) -> float:
    """exp(mean negative log-likelihood) of every token after the first of each sequence.

    Sequences are left-padded into batches (lengths bucketed so that few shapes compile); padding neither
    predicts nor is predicted, and is excluded from routing and capacity as everywhere in moejax. Under a
    capacity policy the tokens of one batch compete for expert slots, so the result depends on batch_size:
    report it with the number.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    sequences = [list(s) for s in sequences]
    if not sequences or all(len(s) < 2 for s in sequences):
        raise ValueError("perplexity needs at least one sequence of two or more tokens")
    graphdef, state = nnx.split(model)
    total, count = 0.0, 0
    for start in range(0, len(sequences), batch_size):
        batch = [s for s in sequences[start:start + batch_size] if len(s) >= 2]
        if not batch:
            continue
        tokens, mask = pad_prompts(batch)
        ll, n = _token_log_likelihoods(graphdef, state, jnp.asarray(tokens), jnp.asarray(mask))
        total += float(ll)
        count += int(n)
    return math.exp(-total / count)
