"""The encoder-decoder families' MoE block: moejax's MoEBlock with the family's router (an optional router
bias, NLLB's top-2 normalised or Switch's top-1 weights) and the family's own expert capacity at inference,
exactly as transformers computes it in eval mode. A loaded model's runtime policy is `FamilyCapacity`; any
moejax.MoEPolicy (moejax.with_policy) replaces the family's rule through moejax.capacity.apply_policy.

The families' capacity rules (transformers' NllbMoeTop2Router and SwitchTransformersTop1Router, eval mode):

- NLLB-MoE (fairseq's top-2 gating): C = ceil(moe_eval_capacity_token_fraction * N) for a forward of N rows,
  padding included (without a positive fraction: expert_capacity, else 2 * ceil(N / E)). Every expert
  fills its C slots with all first choices, then all second choices, each in token order, or, with
  batch_prioritized_routing, by the token's highest router probability (ties: the lower token). Padding
  takes no slot. The weights are the top-2 probabilities normalised over the pair before the drop
  (normalize_router_prob_before_dropping) or over the experts the token kept (that sum clamped below at
  float32's eps, as transformers does). Expert outputs are scaled by 1 - moe_token_dropout.
- Switch: each sequence of the batch separately, an expert takes its first expert_capacity tokens in token
  order; the weight is the top-1 probability. Padding takes no slot here (transformers routes padding too;
  with padding on the right, as the families' tokenizers pad, no real token is affected).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from moejax import capacity, routing
from moejax.capacity import MoEPolicy
from moejax.models.moe import MoEBlock
from moejax.runtime import MoERuntime
from moejax.seq2seq.config import NLLB_MOE, Seq2SeqConfig


@dataclasses.dataclass(frozen=True)
class FamilyCapacity(MoEPolicy):
    """The family's own capacity rule at inference (see the module docstring): the policy a loaded
    encoder-decoder model starts with. moejax's capacity code sees a dropless policy; the family's MoE
    block applies the rule. Another MoEPolicy replaces it (moejax.with_policy)."""


def nllb_capacity(config: Seq2SeqConfig, num_rows: int) -> int:
    """NLLB's expert capacity for a forward of `num_rows` tokens, padding included (module docstring)."""
    if config.capacity_fraction is not None:  # in double precision, as transformers' math.ceil
        return math.ceil(config.capacity_fraction * num_rows)
    if config.expert_capacity is not None:
        return config.expert_capacity
    return 2 * math.ceil(num_rows / config.num_experts)


def nllb_keep(r: routing.Routing, capacity_per_expert: int, batch_prioritized: bool) -> jax.Array:
    """bool [N, 2]: the (token, choice) pairs NLLB's top-2 gating computes: each expert its first
    `capacity_per_expert` pairs, first choices before second choices, within a choice in token order or by
    the token's highest probability; pairs not kept already (padding) take no slot."""
    n, k = r.experts.shape
    num_experts = r.scores.shape[-1]
    choice_major = lambda a: a.T.reshape(-1)  # all first choices, then all second choices, each in token order
    group = choice_major(jnp.where(r.keep, r.experts, num_experts))
    choice_rank = jnp.broadcast_to(jnp.arange(k, 0, -1, dtype=jnp.float32), (n, k))  # first choices rank higher
    priority = choice_rank * 2  # a probability (< 2) orders tokens within a choice, never across choices
    if batch_prioritized:
        priority = priority + r.scores.max(axis=-1, keepdims=True)
    kept = capacity.keep_top_per_group(group, choice_major(priority), capacity_per_expert, num_experts)
    return kept.reshape(k, n).T


def nllb_renormalized(r: routing.Routing) -> routing.Routing:
    """NLLB's weights after its drop: the kept experts' probabilities over their sum, the sum clamped
    below at float32's eps as transformers does (a token that kept only a second choice of probability
    p < eps gets weight p / eps, not 1)."""
    kept = jnp.where(r.keep, jnp.take_along_axis(r.scores, r.experts, axis=-1), 0.0)
    return r._replace(weights=kept / jnp.maximum(kept.sum(-1, keepdims=True), jnp.finfo(jnp.float32).eps))


def switch_keep(r: routing.Routing, token_mask: jax.Array, capacity_per_expert: int) -> jax.Array:
    """bool [N, 1]: Switch's top-1 pairs each expert computes, per sequence of token_mask [B, T] (the rows
    of r in order): its first `capacity_per_expert` tokens of that sequence; padding takes no slot."""
    batch, length = token_mask.shape
    num_experts = r.scores.shape[-1]
    row = jnp.repeat(jnp.arange(batch, dtype=jnp.int32), length)[:, None]
    group = jnp.where(r.keep, row * num_experts + r.experts, batch * num_experts).reshape(-1)
    priority = jnp.zeros(group.shape, jnp.float32)  # ties go to the lower token: token order
    kept = capacity.keep_top_per_group(group, priority, capacity_per_expert, batch * num_experts)
    return kept.reshape(r.experts.shape)


class FamilyMoEBlock(MoEBlock):
    """MoEBlock of an encoder-decoder family (module docstring): the block's own router (softmax top-k,
    NLLB's weights normalised over its two, a router bias where the config has one) and, under FamilyCapacity,
    the family's capacity. token_mask: bool [B, T], the rows of h in order (Switch counts capacity per
    sequence). NLLB scales the experts' combined output by 1 - moe_token_dropout, transformers' inference
    form of its expert output masking."""

    def __init__(self, config: Seq2SeqConfig, stack: str, layer: int, runtime: MoERuntime, *, dtype,
                 rngs: nnx.Rngs):
        super().__init__(config.moe_config(stack), layer, runtime, dtype=dtype, rngs=rngs)
        self.family = config

    def route(self, h: jax.Array, token_mask: jax.Array) -> routing.Routing:
        return super().route(h, token_mask.reshape(-1))

    def apply_policy(self, r: routing.Routing, token_mask: jax.Array, decode: bool = False) -> routing.Routing:
        if not isinstance(self.policy, FamilyCapacity):
            return super().apply_policy(r, token_mask, decode)
        c = self.family
        if c.architecture != NLLB_MOE:
            return r._replace(keep=switch_keep(r, token_mask, c.expert_capacity))
        kept = r._replace(keep=nllb_keep(r, nllb_capacity(c, token_mask.size), c.batch_prioritized_routing))
        return kept if c.normalize_router_prob_before_dropping else nllb_renormalized(kept)

    def combine(self, h: jax.Array, routed: jax.Array) -> jax.Array:
        scale = self.family.expert_output_scale
        return super().combine(h, routed if scale == 1.0 else routed * jnp.asarray(scale, routed.dtype))
