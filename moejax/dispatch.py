"""Dispatch and combine on one device: sort (token, expert) pairs by expert, and put results back.

The experts step sees rows grouped by expert with per-expert counts (the ragged layout of dynamic gating:
no capacity padding). Pairs a policy dropped go after every real group, so no expert computes them.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from moejax.routing import Routing


class Dispatch(NamedTuple):
    """rows [T*k, d] grouped by expert; group_sizes int32 [E]; order int32 [T*k]: rows[i] is pair order[i]."""

    rows: jax.Array
    group_sizes: jax.Array
    order: jax.Array


def dispatch(x: jax.Array, routing: Routing) -> Dispatch:
    """x [T, d] -> the kept (token, expert) pairs' rows sorted by expert id (stable: token order within)."""
    num_experts = routing.scores.shape[-1]
    top_k = routing.experts.shape[-1]
    group = jnp.where(routing.keep, routing.experts, num_experts).reshape(-1)
    order = jnp.argsort(group, stable=True).astype(jnp.int32)
    group_sizes = jnp.bincount(group, length=num_experts + 1)[:num_experts].astype(jnp.int32)
    return Dispatch(x[order // top_k], group_sizes, order)


def combine(expert_out: jax.Array, dispatched: Dispatch, routing: Routing) -> jax.Array:
    """expert_out [T*k, d] (rows in dispatch order) -> [T, d] = sum over kept pairs of weight * output."""
    inverse = jnp.argsort(dispatched.order)  # a gather back is cheaper on CPU than a scatter
    return weighted_sum(expert_out[inverse], routing.weights, routing.keep).astype(expert_out.dtype)


def weighted_sum(per_pair: jax.Array, weights: jax.Array, keep: jax.Array) -> jax.Array:
    """per_pair [T*k, d] in pair order -> float32 [T, d]: each token's kept pairs weighted and summed."""
    num_tokens, top_k = weights.shape
    w = jnp.where(keep, weights, 0.0)
    return jnp.einsum("tkd,tk->td", per_pair.reshape(num_tokens, top_k, -1).astype(jnp.float32), w)
