"""Policy: which routed (token, expert) pairs are computed. Capacity-aware token drop (papers.md A).

A policy only edits `Routing.keep` (and, when asked, renormalises weights); it never reaches into dispatch.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from moejax.routing import Routing

DROP_STRATEGIES = ("score", "first", "last", "random")


@dataclasses.dataclass(frozen=True)
class MoEPolicy:
    """How every MoE block of a model treats expert capacity.

    capacity_factor: None = dropless (the default); else gamma of C = ceil(gamma * T * k / E).
    drop: which pairs an over-full expert keeps: "score" (highest router score), "first", "last", "random".
    renormalize: rescale each token's kept weights to the sum its top-k weights had (off by default, as in
        the paper).
    in_decode: apply the capacity in decode steps too (the authors' code silently did not; here it is a
        visible choice).
    """

    capacity_factor: float | None = None
    drop: str = "score"
    renormalize: bool = False
    in_decode: bool = True

    def __post_init__(self):
        if self.capacity_factor is not None and not self.capacity_factor > 0:
            raise ValueError(f"MoEPolicy: capacity_factor={self.capacity_factor!r} must be > 0 (or None: dropless)")
        if self.drop not in DROP_STRATEGIES:
            raise ValueError(f"MoEPolicy: unknown drop strategy {self.drop!r}; supported: {DROP_STRATEGIES}")

    @property
    def dropless(self) -> bool:
        return self.capacity_factor is None


def expert_capacity(num_tokens: int, top_k: int, num_experts: int, factor: float) -> int:
    """C = ceil(factor * top_k * num_tokens / num_experts), at least 1."""
    if not factor > 0:
        raise ValueError(f"capacity factor={factor!r} must be > 0")
    if top_k > num_experts:
        raise ValueError(f"top_k={top_k} must be <= num_experts={num_experts}")
    return max(1, math.ceil(factor * top_k * num_tokens / num_experts))


def token_drop(scores: jax.Array, experts: jax.Array, capacity: int | jax.Array, strategy: str = "score",
               key: jax.Array | None = None, keep: jax.Array | None = None) -> jax.Array:
    """Capacity-Aware Token Drop: every expert keeps at most `capacity` of its (token, expert) pairs.

    scores [T, E], experts int [T, k] -> keep bool [T, k]. Priority by `strategy`: "score" keeps the highest
    s[t, e] (ties to the lower t), "first" the earliest tokens, "last" the latest, "random" random priorities
    (needs `key`). Pairs already not kept (`keep` False: padding, earlier policies) take no slot.
    """
    num_tokens, top_k = experts.shape
    num_experts = scores.shape[-1]
    if keep is None:
        keep = jnp.ones(experts.shape, bool)
    t = jnp.broadcast_to(jnp.arange(num_tokens)[:, None], experts.shape)
    if strategy == "score":
        priority = jnp.take_along_axis(scores, experts, axis=-1).astype(jnp.float32)
    elif strategy == "first":
        priority = -t.astype(jnp.float32)
    elif strategy == "last":
        priority = t.astype(jnp.float32)
    elif strategy == "random":
        if key is None:
            raise ValueError("token_drop: strategy='random' needs a PRNG key")
        priority = jax.random.uniform(key, experts.shape)
    else:
        raise ValueError(f"token_drop: unknown strategy {strategy!r}; supported: {DROP_STRATEGIES}")
    # Sort pairs by (expert, priority descending, token ascending); a pair's rank inside its expert's run
    # is its index minus the run's start. Pairs not kept go to a sentinel expert after the real ones.
    group = jnp.where(keep, experts, num_experts).reshape(-1)
    order = jnp.lexsort((t.reshape(-1), -priority.reshape(-1), group))
    sorted_group = group[order]
    starts = jnp.searchsorted(sorted_group, jnp.arange(num_experts + 1), side="left")
    rank = jnp.arange(order.shape[0]) - starts[sorted_group]
    kept_sorted = (rank < capacity) & (sorted_group < num_experts)
    return jnp.zeros(order.shape, bool).at[order].set(kept_sorted).reshape(num_tokens, top_k)


def apply_policy(routing: Routing, policy: MoEPolicy, *, num_tokens: jax.Array | int, decode: bool = False,
                 key: jax.Array | None = None) -> Routing:
    """Apply `policy` to a block's routing. `num_tokens` counts real (non-padding) tokens only."""
    if policy.dropless or (decode and not policy.in_decode):
        return routing
    num_experts = routing.scores.shape[-1]
    top_k = routing.experts.shape[-1]
    # Same formula as expert_capacity, on a traced token count (padding excluded).
    capacity = jnp.maximum(1, jnp.ceil(policy.capacity_factor * top_k * num_tokens / num_experts)).astype(jnp.int32)
    keep = token_drop(routing.scores, routing.experts, capacity, policy.drop, key=key, keep=routing.keep)
    weights = routing.weights
    if policy.renormalize:
        total = weights.sum(-1, keepdims=True)
        kept = jnp.where(keep, weights, 0.0).sum(-1, keepdims=True)
        weights = jnp.where(kept > 0, weights * total / jnp.where(kept > 0, kept, 1.0), weights)
    return routing._replace(keep=keep, weights=weights)
