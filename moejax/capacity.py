"""Policy: which routed (token, expert) pairs are computed. Capacity-aware token drop (papers.md A).

A policy only edits `Routing.keep` (and, when asked, renormalises weights); it never reaches into dispatch.
"""

from __future__ import annotations

import dataclasses
import math
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np

from moejax import placement as placement_lib
from moejax.layout import Layout
from moejax.routing import Routing

DROP_STRATEGIES = ("score", "first", "last", "random")
EXPANDED = (None, "local", "global")
SCOPES = ("expert", "device")
# How a token's kept weights are rescaled after a drop (MoEPolicy.renormalize).
RENORMALIZE = ("family", "none", "kept", "routed_sum")
_LEGACY_RENORMALIZE = {False: "none", True: "routed_sum"}  # the booleans the field took before it had modes


@dataclasses.dataclass(frozen=True)
class MoEPolicy:
    """How every MoE block of a model treats expert capacity.

    capacity_factor: None = dropless (the default); else gamma of C = ceil(gamma * T * k / E) per expert,
        or C_dev = ceil(gamma * T * k / D) per device with scope="device". T counts real tokens only. C is
        computed exactly (`expert_capacity`), gamma read as the decimal it prints as (1.2 is 6/5).
    drop: which pairs an over-full expert keeps: "score" (highest router score), "first", "last", "random".
        Ties (equal priority) go to the lower token index (the authors' torch.topk leaves them undefined).
    expanded: None, or Capacity-Aware Expanded Drop: "local" (candidates = top-k plus the experts on the
        token's device) or "global" (every expert is a candidate); each expert keeps its top-C candidates
        by score, weighted by their score.
    scope: "expert" or "device" (capacity per device of the expert axis).
    num_devices / placement: on one device, the expert axis that local experts and device capacity refer
        to (placement: device_of_expert, a tuple of E ints; default contiguous blocks): shorthand for the
        model runtime's `layout.Layout`. Under expert parallelism the layout comes from the mesh and its
        placement instead (these must then be None or agree with it).
    renormalize: how each token's kept weights are rescaled when a capacity applies (dropless forwards,
        and decode steps with in_decode=False, are never touched):
        "family" (default): the family's own normalisation, over the experts the token kept: "kept" for
            families whose router normalises its top-k (norm_topk_prob: Mixtral, Qwen3-MoE, ...), "none"
            for the others (OLMoE, Qwen2-MoE, ...). This is what the authors' code computes.
        "none": the weights as routed (normalised over the routed k where the family normalises), so a
            token that lost an expert has weights summing to less than before.
        "kept": the kept experts' router probabilities divided by their sum, times the family's
            routed_scaling_factor (1 except DeepSeek): every token's weights sum to that, whether it lost
            a pair or not (the authors' `renormalize_after_capacity_drop`, for any family).
        "routed_sum": scaled to the sum the token's routed weights had; a token that lost nothing keeps
            its weights. For norm_topk_prob families that sum is routed_scaling_factor: "kept" there.
        False and True (the field's values before it had modes) mean "none" and "routed_sum".
    in_decode: apply the capacity in decode steps too (the paper's formula; the authors' code silently did
        not: see `MoEPolicy.authors`).
    seed: drop="random" draws each pair's priority from key(seed) folded with the layer and a digest of
        the batch's routing (its real tokens' first choices: `drop_key`), by the pair's real-token ordinal:
        the same batch drops the same pairs, padded or not; another batch or seed others.
    """

    capacity_factor: float | None = None
    drop: str = "score"
    expanded: str | None = None
    scope: str = "expert"
    num_devices: int | None = None
    placement: tuple[int, ...] | None = None
    renormalize: str = "family"
    in_decode: bool = True
    seed: int = 0

    def __post_init__(self):
        if self.capacity_factor is not None:
            try:
                exact_factor(self.capacity_factor)
            except (TypeError, ValueError):
                raise ValueError(f"MoEPolicy: capacity_factor={self.capacity_factor!r} must be > 0 and finite "
                                 "(or None: dropless)") from None
        if isinstance(self.renormalize, bool):
            object.__setattr__(self, "renormalize", _LEGACY_RENORMALIZE[self.renormalize])
        if not isinstance(self.renormalize, str) or self.renormalize not in RENORMALIZE:
            raise ValueError(f"MoEPolicy: unknown renormalize mode {self.renormalize!r}; supported: {RENORMALIZE} "
                             "(or False / True: 'none' / 'routed_sum')")
        if self.drop not in DROP_STRATEGIES:
            raise ValueError(f"MoEPolicy: unknown drop strategy {self.drop!r}; supported: {DROP_STRATEGIES}")
        if self.expanded not in EXPANDED:
            raise ValueError(f"MoEPolicy: unknown expanded mode {self.expanded!r}; supported: {EXPANDED}")
        if self.scope not in SCOPES:
            raise ValueError(f"MoEPolicy: unknown capacity scope {self.scope!r}; supported: {SCOPES}")
        if self.num_devices is not None and (isinstance(self.num_devices, bool) or not isinstance(
                self.num_devices, (int, np.integer)) or self.num_devices < 1):
            raise ValueError(f"MoEPolicy: num_devices={self.num_devices!r} must be an integer >= 1 (or None)")
        if self.placement is not None:
            ids = np.asarray(self.placement)
            if ids.ndim != 1 or ids.size == 0 or ids.dtype.kind not in "iu":  # device ids as given, never rounded
                raise ValueError(f"MoEPolicy: placement must be a non-empty sequence of int device ids; got "
                                 f"{self.placement!r}")
            num_devices = self.num_devices if self.num_devices is not None else int(ids.max()) + 1
            object.__setattr__(self, "placement", tuple(int(d) for d in placement_lib.check(ids, num_devices)))
            object.__setattr__(self, "num_devices", num_devices)
        if (self.expanded is not None or self.scope == "device") and self.capacity_factor is None:
            raise ValueError(f"MoEPolicy: expanded={self.expanded!r}, scope={self.scope!r} needs a capacity_factor")
        # Expanded Drop ranks each expert's candidates by score with a per-expert capacity (papers.md A): a
        # device capacity or another drop order would be silently ignored
        if self.expanded is not None and (self.scope != "expert" or self.drop != "score"):
            raise ValueError(f"MoEPolicy: expanded={self.expanded!r} keeps each expert's top-C candidates by score; "
                             f"scope={self.scope!r}, drop={self.drop!r} do not apply to it (use scope='expert', "
                             "drop='score', or token drop without expanded)")

    @classmethod
    def authors(cls, capacity_factor: float, drop: str = "score", *, expanded: str | None = None,
                num_devices: int | None = None, placement: tuple[int, ...] | None = None,
                renormalize: str = "family", seed: int = 0) -> MoEPolicy:
        """The capacity-aware drop of the paper authors' code (CASE-Lab-UMD/Capacity-Aware-MoE, their
        modeling_*.py MoE blocks), to reproduce their published numbers: capacity off in forwards of one token
        per sequence (their `sequence_length == 1`: every decode step; in moejax those are the forwards with
        decode=True, so in_decode=False), and each token's kept weights renormalised as its family does
        (renormalize="family"; pass "kept" for their renormalize_after_capacity_drop=True).

        Where moejax still differs from their code, on purpose: padding tokens neither count in T nor take
        expert slots; ties go to the lower token index; drop="random" draws from `seed`, not torch.rand; and
        C is exact, where their double-precision ceil(gamma * k * (T / E)) can round an exact integer up
        (gamma=1.1, k=4, E=8, T=100: 56, not 55; at gamma 0.5, 1.0, 1.25, 1.5 and 2.0 the two always agree).
        """
        return cls(capacity_factor=capacity_factor, drop=drop, expanded=expanded, num_devices=num_devices,
                   placement=placement, renormalize=renormalize, in_decode=False, seed=seed)

    def renormalization(self, norm_topk_prob: bool) -> str:
        """The mode a family computes with: "none", "kept" or "routed_sum" ("family" resolved)."""
        if self.renormalize == "family":
            return "kept" if norm_topk_prob else "none"
        return self.renormalize

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


def exact_factor(factor) -> Fraction:
    """A capacity factor as an exact fraction: a float is read as the decimal it prints as (1.2 is 6/5, not
    the binary float just below it), so that C = ceil(gamma * T * k / E) lands on the integer a user means."""
    if isinstance(factor, bool) or not isinstance(factor, (int, float, Fraction, np.integer, np.floating)):
        raise TypeError(f"capacity factor={factor!r} is not a number")
    value = Fraction(str(factor)) if isinstance(factor, (float, np.floating)) else Fraction(factor)
    if not (math.isfinite(factor) and value > 0):
        raise ValueError(f"capacity factor={factor!r} must be a finite number > 0")
    return value


def expert_capacity(num_tokens, top_k: int, num_experts: int, factor: float, *, max_tokens: int | None = None):
    """C = ceil(factor * top_k * num_tokens / num_experts), at least 1, in exact integer arithmetic.

    The one capacity formula: for a Python int count it returns an int; for a traced integer count (the real
    tokens of a forward, padding excluded) an int32 array of the same value, given `max_tokens`, the static
    bound on the count (the forward's rows). num_experts is the number of capacity groups (devices for a
    per-device capacity).
    """
    ratio = exact_factor(factor) * top_k / num_experts  # num_experts: the groups (devices may be fewer than k)
    if isinstance(num_tokens, (int, np.integer)):
        return max(1, _ceil_times(ratio, int(num_tokens)))
    if max_tokens is None:
        raise ValueError("expert_capacity of a traced token count needs max_tokens, its static bound")
    if ratio.numerator * max_tokens + ratio.denominator < 2**31:
        capacity = _ceil_times(ratio, jnp.asarray(num_tokens, jnp.int32))  # no int32 product overflows
    else:  # a product past int32: look the count up in a table of exact Python-int capacities
        table = _ceil_times(ratio, np.arange(max_tokens + 1, dtype=object))
        if table[-1] >= 2**31:
            raise ValueError(f"capacity factor={factor!r}: a capacity of {table[-1]} does not fit in int32")
        capacity = jnp.asarray(table.astype(np.int64), jnp.int32)[num_tokens]
    return jnp.maximum(1, capacity).astype(jnp.int32)


def _ceil_times(ratio: Fraction, count):
    """ceil(ratio * count) exactly, for a Python int or an integer array (floor division rounds down for
    negative numerators in Python, numpy and jax alike)."""
    return -((-ratio.numerator * count) // ratio.denominator)


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
        # drawn by the real token's ordinal (tokens_of_pairs counts real tokens only), so that padding, which
        # shifts row indices, changes no real pair's draw: element i of a uniform draw depends on i alone
        return jax.random.uniform(key, scores_of_pairs.shape)[tokens_of_pairs[:, 0]]  # padding: unused rows
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
    # each pair's token by its ordinal among the real tokens (a token with a pair still kept): orders by
    # token ("first", "last", "random") do not depend on padding
    real = keep.any(axis=-1)
    ordinal = jnp.where(real, jnp.cumsum(real) - 1, num_tokens)
    tokens = jnp.broadcast_to(ordinal[:, None], experts.shape)
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
                 key: jax.Array | None = None, layout: Layout | None = None, norm_topk_prob: bool = False,
                 routed_scaling_factor: float = 1.0) -> Routing:
    """Apply `policy` to a block's routing. `num_tokens` counts real (non-padding) tokens only; `layout`
    (default: the policy's own) says which device holds each expert and token; norm_topk_prob and
    routed_scaling_factor are the family's (what renormalize="family" / "kept" follow).

    Token drop edits `keep` (and, as policy.renormalize says, the weights). Expanded drop returns a wider
    Routing: its experts [T, k + L] are the top-k followed by the L experts local to the token (all E for
    the global variant), each kept pair weighted by its score before renormalisation.
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
        new = _expanded(routing, policy, num_tokens, layout, routed_scaling_factor)
    else:
        device_of_expert = None
        groups = num_experts
        if policy.scope == "device":
            device_of_expert = layout.device_of_expert
            groups = layout.num_devices
        capacity = expert_capacity(num_tokens, top_k, groups, policy.capacity_factor,
                                   max_tokens=routing.experts.shape[0])
        keep = token_drop(routing.scores, routing.experts, capacity, policy.drop, key=key, keep=routing.keep,
                          device_of_expert=device_of_expert)
        new = routing._replace(keep=keep)
    return renormalize(routing, new, policy.renormalization(norm_topk_prob), routed_scaling_factor)


def renormalize(routed: Routing, new: Routing, mode: str, routed_scaling_factor: float = 1.0) -> Routing:
    """`new` (the routing after a drop) with each token's kept weights rescaled as `mode` says (see
    MoEPolicy.renormalize); a token that lost every pair keeps its (unused) weights.

    "kept" recomputes the weights from the router scores of the kept experts, p / sum(p) * scaling, the very
    formula a norm_topk_prob family routes with, so a token that lost nothing keeps the weights it was routed
    with. "routed_sum" multiplies by routed sum / kept sum, exactly 1 for a token that lost nothing.
    """
    if mode == "none":
        return new
    if mode == "kept":
        weights = jnp.take_along_axis(new.scores, new.experts, axis=-1)
        target = routed_scaling_factor
    elif mode == "routed_sum":
        weights = new.weights
        target = jnp.where(routed.keep, routed.weights, 0.0).sum(-1, keepdims=True)
    else:
        raise ValueError(f"unknown renormalize mode {mode!r}; supported: 'none', 'kept', 'routed_sum'")
    kept = jnp.where(new.keep, weights, 0.0).sum(-1, keepdims=True)
    return new._replace(weights=jnp.where(kept > 0, weights / jnp.where(kept > 0, kept, 1.0) * target, new.weights))


def drop_key(policy: MoEPolicy, layer: int, router_logits: jax.Array, token_mask: jax.Array | None = None
             ) -> jax.Array | None:
    """The PRNG key of drop="random" for one MoE layer and batch (see MoEPolicy.seed); None otherwise.

    The batch's digest is of integers, not floats: each real token's ordinal and first choice (the router's
    argmax), mixed and XORed together. Padding (token_mask False) takes no part, and the last-bit noise by
    which a padded forward's logits differ from an unpadded one's changes no argmax short of a near-tie, so
    the same prompt alone or in a padded batch draws the same priorities."""
    if policy.drop != "random" or policy.dropless:
        return None
    logits = router_logits.reshape(-1, router_logits.shape[-1])
    real = jnp.ones(logits.shape[:1], bool) if token_mask is None else token_mask.reshape(-1).astype(bool)
    ordinal = (jnp.cumsum(real) - 1).astype(jnp.uint32)
    first = jnp.argmax(logits, axis=-1).astype(jnp.uint32) + jnp.uint32(1)
    mixed = ordinal * jnp.uint32(0x9E3779B1) ^ first * jnp.uint32(0x85EBCA77)
    mixed = (mixed ^ (mixed >> 15)) * jnp.uint32(0x2C1B3C6D)  # so that nearby (ordinal, choice) differ widely
    digest = jax.lax.reduce(jnp.where(real, mixed, jnp.uint32(0)), jnp.uint32(0), jax.lax.bitwise_xor, (0,))
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(policy.seed), layer), digest)


def _expanded(routing: Routing, policy: MoEPolicy, num_tokens, layout: Layout | None,
              routed_scaling_factor: float = 1.0) -> Routing:
    scores, experts = routing.scores, routing.experts
    t_count, num_experts = scores.shape
    top_k = experts.shape[-1]
    valid = routing.keep.any(axis=-1)  # real tokens (padding has no candidates)
    if policy.expanded == "global":
        extra = jnp.broadcast_to(jnp.arange(num_experts, dtype=jnp.int32), (t_count, num_experts))
    else:
        extra = jnp.asarray(layout.local_experts(t_count))  # [T, L]
    local = jnp.zeros((t_count, num_experts), bool).at[jnp.arange(t_count)[:, None], extra].set(True)
    capacity = expert_capacity(num_tokens, top_k, num_experts, policy.capacity_factor, max_tokens=t_count)
    # padding's own top-k would be candidates too: ranked last, it can take no real token's slot
    keep_dense = expanded_drop(jnp.where(valid[:, None], scores, -jnp.inf), experts, capacity, local & valid[:, None])
    keep_dense &= valid[:, None]
    # Compact [T, E] -> [T, k + L]: the top-k first, then local experts not already among them.
    wide = jnp.concatenate([experts, extra], axis=-1)
    duplicate = (extra[:, :, None] == experts[:, None, :]).any(-1)
    first = jnp.concatenate([jnp.ones_like(experts, bool), ~duplicate], axis=-1)
    keep = jnp.take_along_axis(keep_dense, wide, axis=-1) & first
    # each kept pair weighted by its score, times the family's routed_scaling_factor as every routed output
    weights = jnp.take_along_axis(scores, wide, axis=-1) * routed_scaling_factor
    return Routing(scores, wide, weights, keep, routing.logits)
