"""Route: router logits -> Routing(scores, experts, weights). Pure functions of arrays, jit-able."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class Routing(NamedTuple):
    """Which experts each token goes to, and with what weight.

    scores:  float32 [T, E]  the router's probability of every expert (what capacity policies rank by)
    experts: int32   [T, k]  the chosen experts, highest score first
    weights: float32 [T, k]  the combine weight of each chosen expert
    keep:    bool    [T, k]  whether the (token, expert) pair is computed; a policy clears it to drop a pair
    logits:  float32 [T, E]  the router's logits (the router z-loss needs them), or None
    """

    scores: jax.Array
    experts: jax.Array
    weights: jax.Array
    keep: jax.Array
    logits: jax.Array | None = None


def route(logits: jax.Array, top_k: int, *, norm_topk_prob: bool = False, topk_method: str = "greedy",
          n_group: int = 1, topk_group: int = 1, routed_scaling_factor: float = 1.0,
          token_mask: jax.Array | None = None) -> Routing:
    """Softmax router followed by top-k, as Mixtral / OLMoE / Qwen2-MoE / DeepSeek-V2 compute it.

    logits: [T, E]. `group_limited_greedy` (DeepSeek-V2) first keeps the `topk_group` groups of experts whose
    best score is highest, then takes the top-k among their experts. `token_mask` [T] marks real tokens;
    padding tokens get keep=False so they take no expert slot.
    """
    logits = logits.astype(jnp.float32)
    num_experts = logits.shape[-1]
    if not 0 < top_k <= num_experts:
        raise ValueError(f"top_k={top_k} must be in [1, num_experts={num_experts}]")
    scores = jax.nn.softmax(logits, axis=-1)
    candidates = scores
    if topk_method == "group_limited_greedy":
        grouped = scores.reshape(scores.shape[0], n_group, num_experts // n_group)
        _, best_groups = jax.lax.top_k(grouped.max(axis=-1), topk_group)
        group_mask = jnp.zeros(grouped.shape[:2], bool).at[jnp.arange(scores.shape[0])[:, None], best_groups].set(True)
        candidates = jnp.where(jnp.repeat(group_mask, num_experts // n_group, axis=-1), scores, 0.0)
    elif topk_method != "greedy":
        raise ValueError(f"unknown topk_method {topk_method!r}; supported: 'greedy', 'group_limited_greedy'")
    weights, experts = jax.lax.top_k(candidates, top_k)
    if norm_topk_prob:
        weights = weights / weights.sum(axis=-1, keepdims=True)
    weights = weights * routed_scaling_factor
    if token_mask is None:
        keep = jnp.ones(experts.shape, bool)
    else:
        keep = jnp.broadcast_to(token_mask[:, None], experts.shape)
    return Routing(scores, experts.astype(jnp.int32), weights, keep, logits)
