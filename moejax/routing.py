"""Route: router logits -> Routing(scores, experts, weights). Pure functions of arrays, jit-able.

Router flavours, and the score capacity-aware drop ranks by
-----------------------------------------------------------
Every flavour fills `Routing.scores` [T, E] with the score its combine weights are made of, and the
capacity policies (moejax.capacity: token drop "score", expanded drop, the "kept" renormalisation) rank
pairs by `scores` and nothing else, so the policy code is one path for every family:

- softmax (Mixtral, OLMoE, Qwen2-MoE, Qwen3-MoE, DeepSeek-V2, Granite): the softmax probability over all
  experts. Greedy picks the top-k of it; DeepSeek-V2's group_limited_greedy first keeps the topk_group
  groups with the highest best probability. The weights are the chosen probabilities (renormalised by
  norm_topk_prob). Granite's softmax over the top-k logits is exactly that renormalisation, so it ranks by
  the same all-expert probability (the order of the top-k logits and of the probabilities is the same).
- softmax with a correction bias (ERNIE-4.5, noaux_tc with one group): the choice adds
  e_score_correction_bias to the probabilities, the weights are the unbiased probabilities renormalised;
  capacity-aware drop ranks by the unbiased probability, for the reasons below.
- sigmoid with noaux_tc (DeepSeek-V3 / Moonlight, GLM-4.5, dots.llm1, MiniMax-M2 with one group): the
  *unbiased* sigmoid score sigmoid(logit). The choice adds the learned `e_score_correction_bias` (groups ranked by the sum of their
  top-2 biased scores, then the top-k biased scores of the topk_group best groups), but the weights are the
  unbiased scores of the chosen experts. Capacity-aware drop ranks by the unbiased score because that is
  what a pair contributes to the output: the bias is a load-balancing offset, trained to even out expert
  loads, and says nothing about how much a token needs an expert; ranking by it would keep the pairs the
  balancer favours over those that weigh most. It also keeps "kept" renormalisation exact: the weights
  recomputed from the kept experts' scores, s / sum(s) * routed_scaling_factor, are the very weights
  the router gives a token that lost nothing.
- softmax over the top-k logits (GPT-OSS, its router with a bias): that is the all-expert softmax of the
  biased logits renormalised over the top-k (norm_topk_prob), so scores hold the all-expert probability, as
  for Mixtral. Capacity-aware drop ranks an expert's pairs by it rather than by the post-top-k softmax (the
  combine weight): within a token both order the experts alike, and across tokens the post-top-k weight
  says only how the chosen experts split a token between them (a token whose top-k logits tie gives each
  1/k however sure the router is of them), while the all-expert probability says how much of the router's
  belief the pair carries. "kept" renormalisation recovers the post-top-k softmax over the kept experts.
- sigmoid, top-1, scaling the expert's input (Llama 4): the sigmoid of the logit, the factor the token is
  multiplied by before its expert (the block passes x * score in and combines with weight 1, exact for one
  expert). Drop ranks by it: it is the size of what the pair adds to the output (an expert without biases
  is positively homogeneous only for ReLU-like activations, but a larger score still means a larger input).
  With top-1, dropping a pair leaves the token the shared expert alone; no renormalisation applies.
- sparsemixer (Phi-3.5-MoE, eval mode): `sparsemixer` below. The first expert is the top logit, weighted by
  the softmax over the experts whose logits lie within a relative band 2 * jitter_eps of it; the second is
  the top logit among the rest, weighted by the softmax over the band around it (the first excluded). scores
  hold, for the first expert, its first-round probability, and for every other expert its second-round one
  (0 outside the bands): each expert's weight were it chosen in the round it competes in. Drop ranks by it
  because it is the pair's combine weight; non-chosen experts (expanded drop's candidates) rank by what
  they would weigh as a second choice.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from moejax.config import TOPK_METHODS


class Routing(NamedTuple):
    """Which experts each token goes to, and with what weight.

    scores:  float32 [T, E]  the router's score of every expert, the one the weights are made of (what
                             capacity policies rank by; see the module docstring)
    experts: int32   [T, k]  the chosen experts, highest choice score first
    weights: float32 [T, k]  the combine weight of each chosen expert
    keep:    bool    [T, k]  whether the (token, expert) pair is computed; a policy clears it to drop a pair
    logits:  float32 [T, E]  the router's logits (the router z-loss needs them), or None
    """

    scores: jax.Array
    experts: jax.Array
    weights: jax.Array
    keep: jax.Array
    logits: jax.Array | None = None


def router_scores(logits: jax.Array, scoring_func: str = "softmax") -> jax.Array:
    """[T, E] float32 scores of the logits: softmax over the experts, or each expert's sigmoid."""
    logits = logits.astype(jnp.float32)
    if scoring_func == "softmax":
        return jax.nn.softmax(logits, axis=-1)
    if scoring_func == "sigmoid":
        return jax.nn.sigmoid(logits)
    raise ValueError(f"unknown scoring_func {scoring_func!r}; supported: 'softmax', 'sigmoid'")


def group_scores(scores: jax.Array, topk_method: str, n_group: int, score_bias: jax.Array | None = None) -> jax.Array:
    """[T, n_group] what groups are ranked by: the best score of each group (group_limited_greedy) or the
    sum of its top-2 biased scores (noaux_tc)."""
    grouped = _choice(scores, topk_method, score_bias).reshape(scores.shape[0], n_group, -1)
    if topk_method == "noaux_tc":
        return jax.lax.top_k(grouped, 2)[0].sum(axis=-1)
    return grouped.max(axis=-1)


def choice_scores(scores: jax.Array, topk_method: str = "greedy", n_group: int = 1, topk_group: int = 1,
                  score_bias: jax.Array | None = None) -> jax.Array:
    """[T, E] the values top-k picks experts by: the scores (greedy), limited to the topk_group best groups
    (group_limited_greedy: others 0), or the scores plus the correction bias, limited likewise (noaux_tc:
    others -inf). The weights are always taken from `scores`."""
    if topk_method == "greedy":
        return scores
    if topk_method == "sparsemixer":
        raise ValueError("sparsemixer chooses in rounds over the logits (routing.sparsemixer), not by choice scores")
    if topk_method not in TOPK_METHODS:
        raise ValueError(f"unknown topk_method {topk_method!r}; supported: {TOPK_METHODS}")
    t, e = scores.shape
    _, best = jax.lax.top_k(group_scores(scores, topk_method, n_group, score_bias), topk_group)
    in_best = jnp.zeros((t, n_group), bool).at[jnp.arange(t)[:, None], best].set(True)
    masked = -jnp.inf if topk_method == "noaux_tc" else 0.0
    return jnp.where(jnp.repeat(in_best, e // n_group, axis=-1), _choice(scores, topk_method, score_bias), masked)


def _choice(scores: jax.Array, topk_method: str, score_bias: jax.Array | None) -> jax.Array:
    if topk_method != "noaux_tc":
        return scores
    if score_bias is None:
        raise ValueError("topk_method='noaux_tc' needs the router's score_bias (e_score_correction_bias) [E]")
    return scores + score_bias.astype(jnp.float32)


def sparsemixer(logits: jax.Array, jitter_eps: float) -> tuple[jax.Array, jax.Array]:
    """Phi-3.5-MoE's top-2 rule in eval mode (transformers' sparsemixer with training=False): logits [T, E] ->
    (scores float32 [T, E], experts int [T, 2]); see the module docstring. Ties go to the lower expert id."""
    logits = logits.astype(jnp.float32)
    t = logits.shape[0]

    def choose(candidates):  # candidates: the logits, earlier choices at -inf
        best = jnp.argmax(candidates, axis=-1)
        peak = candidates[jnp.arange(t), best][:, None]
        outside = (peak - logits) / jnp.maximum(jnp.abs(logits), peak) > 2 * jitter_eps
        return best, jax.nn.softmax(jnp.where(outside, -jnp.inf, candidates), axis=-1)

    first, p_first = choose(logits)
    is_first = jax.nn.one_hot(first, logits.shape[-1], dtype=bool)
    second, p_second = choose(jnp.where(is_first, -jnp.inf, logits))
    return jnp.where(is_first, p_first, p_second), jnp.stack([first, second], axis=-1)


def route(logits: jax.Array, top_k: int, *, norm_topk_prob: bool = False, topk_method: str = "greedy",
          n_group: int = 1, topk_group: int = 1, routed_scaling_factor: float = 1.0, scoring_func: str = "softmax",
          score_bias: jax.Array | None = None, token_mask: jax.Array | None = None,
          jitter_eps: float = 0.01) -> Routing:
    """The router as every supported family computes it (see the module docstring).

    logits: [T, E]. Scores by `scoring_func`; experts by `choice_scores` (topk_method, groups, score_bias
    [E] for noaux_tc), or both by `sparsemixer` (top_k 2, jitter_eps); weights: the chosen experts' scores,
    renormalised to sum to 1 by norm_topk_prob, times routed_scaling_factor. `token_mask` [T] marks real
    tokens; padding tokens get keep=False so they take no expert slot.
    """
    logits = logits.astype(jnp.float32)
    num_experts = logits.shape[-1]
    if not 0 < top_k <= num_experts:
        raise ValueError(f"top_k={top_k} must be in [1, num_experts={num_experts}]")
    if topk_method == "sparsemixer":
        if top_k != 2:
            raise ValueError(f"top_k={top_k}: sparsemixer routes every token to exactly 2 experts")
        scores, experts = sparsemixer(logits, jitter_eps)
    else:
        scores = router_scores(logits, scoring_func)
        _, experts = jax.lax.top_k(choice_scores(scores, topk_method, n_group, topk_group, score_bias), top_k)
    weights = jnp.take_along_axis(scores, experts, axis=-1)
    if norm_topk_prob:
        weights = weights / weights.sum(axis=-1, keepdims=True)
    weights = weights * routed_scaling_factor
    if token_mask is None:
        keep = jnp.ones(experts.shape, bool)
    else:
        keep = jnp.broadcast_to(token_mask[:, None], experts.shape)
    return Routing(scores, experts.astype(jnp.int32), weights, keep, logits)
