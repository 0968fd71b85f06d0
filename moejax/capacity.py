"""Policy: which routed (token, expert) pairs are computed. Capacity-aware token drop (papers.md A).

A policy only edits `Routing.keep` (and, when asked, renormalises weights); it never reaches into dispatch.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from moejax.layout import Layout
from moejax.routing import Routing

DROP_STRATEGIES = ("score", "first", "last", "random")
EXPANDED = (None, "local", "global")
SCOPES = ("expert", "device")


@dataclasses.dataclass(frozen=True)
class MoEPolicy:
    """How every MoE block of a model treats expert capacity.

    capacity_factor: None = dropless (the default); else gamma of C = ceil(gamma * T * k / E) per expert,
        or C_dev = ceil(gamma * T * k / D) per device with scope="device". T counts real tokens only.
    drop: which pairs an over-full expert keeps: "score" (highest router score), "first", "last", "random".
    expanded: None, or Capacity-Aware Expanded Drop: "local" (candidates = top-k plus the experts on the
        token's device) or "global" (every expert is a candidate); each expert keeps its top-C candidates
        by score, weighted by their score.
    scope: "expert" or "device" (capacity per device of the expert axis).
    num_devices / placement: on one device, the expert axis that local experts and device capacity refer
        to (placement: device_of_expert, a tuple of E ints; default contiguous blocks): shorthand for the
        model runtime's `layout.Layout`. Under expert parallelism the layout comes from the mesh and its
        placement instead (these must then be None or agree with it).
    renormalize: rescale each token's kept weights to the sum its routed weights had (off by default, as
        in the paper).
    in_decode: apply the capacity in decode steps too (the authors' code silently did not; here it is a
        visible choice).
    seed: drop="random" draws each pair's priority from key(seed) folded with the layer and a digest of
        the batch's router logits: the same batch drops the same pairs, another batch or seed others.
    """

    capacity_factor: float | None = None
    drop: str = "score"
    expanded: str | None = None
    scope: str = "expert"
    num_devices: int | None = None
    placement: tuple[int, ...] | None = None
    renormalize: bool = False
    in_decode: bool = True
    seed: int = 0

    def __post_init__(self):
        if self.capacity_factor is not None and not self.capacity_factor > 0:
            raise ValueError(f"MoEPolicy: capacity_factor={self.capacity_factor!r} must be > 0 (or None: dropless)")
        if self.drop not in DROP_STRATEGIES:
            raise ValueError(f"MoEPolicy: unknown drop strategy {self.drop!r}; supported: {DROP_STRATEGIES}")
        if self.expanded not in EXPANDED:
            raise ValueError(f"MoEPolicy: unknown expanded mode {self.expanded!r}; supported: {EXPANDED}")
        if self.scope not in SCOPES:
            raise ValueError(f"MoEPolicy: unknown capacity scope {self.scope!r}; supported: {SCOPES}")
        if self.placement is not None:
            object.__setattr__(self, "placement", tuple(int(d) for d in self.placement))
            if self.num_devices is None:
                object.__setattr__(self, "num_devices", max(self.placement) + 1)
        if (self.expanded is not None or self.scope == "device") and self.capacity_factor is None:
            raise ValueError(f"MoEPolicy: expanded={self.expanded!r}, scope={self.scope!r} needs a capacity_factor")

    @property
    def needs_layout(self) -> bool:
        """Whether the policy needs to know which device holds each expert (and token)."""
        return not self.dropless and (self.expanded == "local" or self.scope == "device")

    @property
    def dropless(self) -> bool:
        return self.capacity_factor is None

    def layout(self, num_experts: int) -> Layout | None:
        """The one-device layout that num_devices / placement describe (None if they are not given)."""
        if self.num_devices is None:
            return None
        return Layout.build(num_experts, self.num_devices, self.placement)


def expert_capacity(num_tokens: int, top_k: int, num_experts: int, factor: float) -> int:
    """C = ceil(factor * top_k * num_tokens / num_experts), at least 1."""
    if not factor > 0:
        raise ValueError(f"capacity factor={factor!r} must be > 0")
    if top_k > num_experts:
        raise ValueError(f"top_k={top_k} must be <= num_experts={num_experts}")
    return max(1, math.ceil(factor * top_k * num_tokens / num_experts))


def _traced_capacity(factor: float, top_k: int, num_tokens, groups: int) -> jax.Array:
    """expert_capacity's formula on a traced token count (padding excluded)."""
    return jnp.maximum(1, jnp.ceil(factor * top_k * num_tokens / groups)).astype(jnp.int32)


def keep_top_per_group(group: jax.Array, priority: jax.Array, capacity, num_groups: int) -> jax.Array:
    """bool [P]: for each group g in [0, num_groups), the `capacity` pairs of highest priority (ties to the
    lower pair index); pairs with group >= num_groups (not candidates) are never kept."""
    index = jnp.arange(group.shape[0])
    # Sort by (group, priority descending, index); a pair's rank in its group is its position minus the
    # group's start.
    order = jnp.lexsort((index, -priority, group))
    sorted_group = group[order]
    starts = jnp.searchsorted(sorted_group, jnp.arange(num_groups + 1), side="left")
    rank = index - starts[jnp.minimum(sorted_group, num_groups)]
    kept_sorted = (rank < capacity) & (sorted_group < num_groups)
    return jnp.zeros(group.shape, bool).at[order].set(kept_sorted)


def _priority(strategy: str, scores_of_pairs: jax.Array, tokens_of_pairs: jax.Array, key) -> jax.Array:
    if strategy == "score":
        return scores_of_pairs.astype(jnp.float32)
    if strategy == "first":
        return -tokens_of_pairs.astype(jnp.float32)
    if strategy == "last":
        return tokens_of_pairs.astype(jnp.float32)
    if strategy == "random":
        if key is None:
            raise ValueError("token_drop: strategy='random' needs a PRNG key")
        return jax.random.uniform(key, scores_of_pairs.shape)
    raise ValueError(f"token_drop: unknown strategy {strategy!r}; supported: {DROP_STRATEGIES}")


def token_drop(scores: jax.Array, experts: jax.Array, capacity: int | jax.Array, strategy: str = "score",
               key: jax.Array | None = None, keep: jax.Array | None = None,
               device_of_expert: np.ndarray | None = None) -> jax.Array:
    """Capacity-Aware Token Drop: every expert keeps at most `capacity` of its (token, expert) pairs.

    scores [T, E], experts int [T, k] -> keep bool [T, k]. Priority by `strategy`: "score" keeps the highest
    s[t, e] (ties to the lower t), "first" the earliest tokens, "last" the latest, "random" random priorities
    (needs `key`). Pairs already not kept (`keep` False: padding, earlier policies) take no slot. With
    `device_of_expert` [E] the capacity is per device instead of per expert.
    """
    num_tokens, top_k = experts.shape
    num_groups = scores.shape[-1]
    group = experts
    if device_of_expert is not None:  # a static placement: capacity per device
        device_of_expert = np.asarray(device_of_expert)
        group = jnp.asarray(device_of_expert)[experts]
        num_groups = int(device_of_expert.max()) + 1
    if keep is None:
        keep = jnp.ones(experts.shape, bool)
    tokens = jnp.broadcast_to(jnp.arange(num_tokens)[:, None], experts.shape)
    priority = _priority(strategy, jnp.take_along_axis(scores, experts, axis=-1), tokens, key)
    group = jnp.where(keep, group, num_groups).reshape(-1)
    kept = keep_top_per_group(group, priority.reshape(-1), capacity, num_groups)
    return kept.reshape(num_tokens, top_k)


def expanded_drop(scores: jax.Array, experts: jax.Array, capacity: int | jax.Array, local: jax.Array) -> jax.Array:
    """Capacity-Aware Expanded Drop -> keep bool [T, E].

    scores [T, E], experts int [T, k], local bool [T, E] (expert e is on token t's device; all True for the
    global variant). Candidates are top-k | local; each expert keeps its top-`capacity` candidates by
    s[t, e], ties to the lower t.
    """
    num_tokens, num_experts = scores.shape
    routed = jnp.zeros((num_tokens, num_experts), bool).at[jnp.arange(num_tokens)[:, None], experts].set(True)
    candidate = routed | local
    # Flatten expert-major so that, within an expert, a lower pair index is a lower token.
    group = jnp.where(candidate, jnp.arange(num_experts)[None, :], num_experts).T.reshape(-1)
    kept = keep_top_per_group(group, scores.T.reshape(-1).astype(jnp.float32), capacity, num_experts)
    return kept.reshape(num_experts, num_tokens).T


def apply_policy(routing: Routing, policy: MoEPolicy, *, num_tokens: jax.Array | int, decode: bool = False,
                 key: jax.Array | None = None, layout: Layout | None = None) -> Routing:
    """Apply `policy` to a block's routing. `num_tokens` counts real (non-padding) tokens only; `layout`
    (default: the policy's own) says which device holds each expert and token.

    Token drop edits `keep` (and with renormalize, the weights). Expanded drop returns a wider Routing:
    its experts [T, k + L] are the top-k followed by the L experts local to the token (all E for the
    global variant), each kept pair weighted by its score.
    """
    if policy.dropless or (decode and not policy.in_decode):
        return routing
    num_experts = routing.scores.shape[-1]
    top_k = routing.experts.shape[-1]
    if layout is None:
        layout = policy.layout(num_experts)
    if layout is None and policy.needs_layout:
        raise ValueError(f"MoEPolicy: expanded={policy.expanded!r}, scope={policy.scope!r} needs a layout")
    if policy.expanded is not None:
        new = _expanded(routing, policy, num_tokens, layout)
    else:
        device_of_expert = None
        groups = num_experts
        if policy.scope == "device":
            device_of_expert = layout.device_of_expert
            groups = layout.num_devices
        capacity = _traced_capacity(policy.capacity_factor, top_k, num_tokens, groups)
        keep = token_drop(routing.scores, routing.experts, capacity, policy.drop, key=key, keep=routing.keep,
                          device_of_expert=device_of_expert)
        new = routing._replace(keep=keep)
    if policy.renormalize:
        total = jnp.where(routing.keep, routing.weights, 0.0).sum(-1, keepdims=True)
        kept = jnp.where(new.keep, new.weights, 0.0).sum(-1, keepdims=True)
        new = new._replace(weights=jnp.where(kept > 0, new.weights * total / jnp.where(kept > 0, kept, 1.0),
                                             new.weights))
    return new


def drop_key(policy: MoEPolicy, layer: int, router_logits: jax.Array) -> jax.Array | None:
    """The PRNG key of drop="random" for one MoE layer and batch (see MoEPolicy.seed); None otherwise."""
    if policy.drop != "random" or policy.dropless:
        return None
    digest = jax.lax.bitcast_convert_type(jnp.sum(router_logits.astype(jnp.float32)), jnp.uint32)
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(policy.seed), layer), digest)


def _expanded(routing: Routing, policy: MoEPolicy, num_tokens, layout: Layout | None) -> Routing:
    scores, experts = routing.scores, routing.experts
    t_count, num_experts = scores.shape
    top_k = experts.shape[-1]
    valid = routing.keep.any(axis=-1)  # real tokens (padding has no candidates)
    if policy.expanded == "global":
        extra = jnp.broadcast_to(jnp.arange(num_experts, dtype=jnp.int32), (t_count, num_experts))
    else:
        extra = jnp.asarray(layout.local_experts(t_count))  # [T, L]
    local = jnp.zeros((t_count, num_experts), bool).at[jnp.arange(t_count)[:, None], extra].set(True)
    capacity = _traced_capacity(policy.capacity_factor, top_k, num_tokens, num_experts)
    keep_dense = expanded_drop(scores, experts, capacity, local & valid[:, None])
    keep_dense &= valid[:, None]
    # Compact [T, E] -> [T, k + L]: the top-k first, then local experts not already among them.
    wide = jnp.concatenate([experts, extra], axis=-1)
    duplicate = (extra[:, :, None] == experts[:, None, :]).any(-1)
    first = jnp.concatenate([jnp.ones_like(experts, bool), ~duplicate], axis=-1)
    keep = jnp.take_along_axis(keep_dense, wide, axis=-1) & first
    weights = jnp.take_along_axis(scores, wide, axis=-1)
    return Routing(scores, wide, weights, keep, routing.logits)
