"""MoEPolicy.authors against a plain-numpy transcription of the paper authors' capacity rule
(CASE-Lab-UMD/Capacity-Aware-MoE, modeling_hf/modeling_olmoe.py: OlmoeSparseMoeBlock.forward and
adjust_tokens; their Qwen2-MoE and DeepSeek blocks compute the same): prefill drops, decode steps do not."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

import moejax
from moejax import capacity
from moejax.models.transformer import init_cache
from tests.tiny import tiny_config


def authors_combine_weights(scores, sequence_length, top_k, factor, strategy, norm_topk_prob):
    """Their rule on one MoE layer's router probabilities scores [T, E] (T = batch * sequence_length, no
    padding) -> the weight [T, E] each (token, expert) pair is combined with (0: not computed).

    Capacity is off when sequence_length == 1; else C = ceil(gamma * k * (T / E)) and each over-full expert
    keeps its top-C pairs by priority: the score, or a running count of its pairs from the end ("first") or
    from the start ("last"); "expanded" is their "overselect" with every expert local. Kept weights are the
    scores, renormalised over the kept experts when the family normalises its top-k. Their torch.topk leaves
    ties undefined; here they go to the lower token, as moejax documents.
    """
    num_tokens, num_experts = scores.shape
    top = np.argsort(-scores, axis=-1, kind="stable")[:, :top_k]
    mask = np.zeros(scores.shape, bool)
    np.put_along_axis(mask, top, True, axis=-1)
    cap = None if sequence_length == 1 else math.ceil(factor * top_k * (num_tokens / num_experts))
    if cap is not None and strategy == "expanded":
        candidates = np.ones(scores.shape, bool)  # top-k | every expert
        kept = np.zeros(scores.shape, bool)
        for e in range(num_experts):
            kept[np.argsort(-scores[:, e], kind="stable")[:cap], e] = True
        mask = candidates & kept
    elif cap is not None:
        for e in np.flatnonzero(mask.sum(0) > cap):
            column = mask[:, e]
            priority = {"score": scores[:, e], "last": np.cumsum(column),
                        "first": np.cumsum(column[::-1])[::-1]}[strategy].astype(np.float64)
            priority = np.where(column, priority, -np.inf)
            mask[:, e] = False
            mask[np.argsort(-priority, kind="stable")[:cap], e] = True
    weights = np.where(mask, scores, 0.0)
    if norm_topk_prob:
        weights = weights / np.maximum(weights.sum(-1, keepdims=True), 1e-20)
    return weights


def combine_weights(r) -> np.ndarray:
    """moejax's Routing as the same [T, E] weights: each kept pair's weight at its expert."""
    experts, weights, keep = (np.asarray(a) for a in (r.experts, r.weights, r.keep))
    dense = np.zeros(r.scores.shape)
    for t, j in zip(*np.nonzero(keep)):
        dense[t, experts[t, j]] += weights[t, j]
    return dense


FAMILIES = {"mixtral": {}, "olmoe": dict(qk_norm=True, norm_topk_prob=False)}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def model(request):
    config = tiny_config(architecture=request.param, num_experts=8, num_experts_per_tok=2, **FAMILIES[request.param])
    model = moejax.random_model(config, seed=6)
    for block in model.moe_blocks():
        block.router[...] = block.router[...] * 10  # decisive routing: uneven loads, as a trained model has
    return model


@pytest.mark.parametrize("strategy", ["score", "first", "last", "expanded"])
def test_authors_preset_matches_their_rule_in_prefill_and_decode(model, strategy):
    factor, batch, length = 0.5, 4, 12
    drop = dict(expanded="global", num_devices=1) if strategy == "expanded" else dict(drop=strategy)
    preset = moejax.with_policy(model, moejax.MoEPolicy.authors(factor, **drop))
    tokens = jnp.asarray(np.random.RandomState(0).randint(0, 64, size=(batch, length)))
    prefill = preset.forward(tokens, cache=init_cache(model.config, batch, length + 2, jnp.float32))
    step = preset.forward(jnp.argmax(prefill.logits[:, -1:], -1), cache=prefill.cache, decode=True)
    k, norm = model.config.num_experts_per_tok, model.config.norm_topk_prob
    for forward, sequence_length in ((prefill, length), (step, 1)):
        for r in forward.routings:
            theirs = authors_combine_weights(np.asarray(r.scores, np.float64), sequence_length, k, factor, strategy,
                                             norm)
            np.testing.assert_allclose(combine_weights(r), theirs, rtol=1e-5, atol=1e-7)
    # the rule bites in prefill (pairs dropped) and not in decode (every routed pair kept)
    assert not all(bool(r.keep.all()) for r in prefill.routings)
    assert all(bool(r.keep.all()) for r in step.routings)


def test_the_default_policy_drops_in_decode_where_the_preset_does_not(model):
    """Four identical rows decode the same token: each of its experts gets 4 pairs, over C = 1 at gamma 0.5."""
    tokens = jnp.asarray([[1, 2, 3, 4]] * 4)
    kept = {}
    for name, policy in (("default", moejax.MoEPolicy(capacity_factor=0.5)), ("authors", moejax.MoEPolicy.authors(0.5))):
        m = moejax.with_policy(model, policy)
        prefill = m.forward(tokens, cache=init_cache(m.config, 4, 8, jnp.float32))
        step = m.forward(jnp.argmax(prefill.logits[:, -1:], -1), cache=prefill.cache, decode=True)
        kept[name] = all(bool(r.keep.all()) for r in step.routings)
    assert kept == {"default": False, "authors": True}


def test_the_preset_is_the_default_policy_but_for_decode_steps():
    preset = moejax.MoEPolicy.authors(1.5, "first", seed=3)
    assert preset == moejax.MoEPolicy(capacity_factor=1.5, drop="first", seed=3, in_decode=False)
    assert preset.renormalize == "family"
    assert moejax.MoEPolicy.authors(1.0, renormalize="kept").renormalize == "kept"  # their renormalize flag
    with pytest.raises(ValueError, match="unknown renormalize mode 'yes'"):
        moejax.MoEPolicy.authors(1.0, renormalize="yes")


@pytest.mark.parametrize("factor", [0.5, 1.0, 1.25, 1.5, 2.0])
def test_capacity_equals_their_formula_at_the_factors_they_published(factor):
    for top_k, num_experts in [(2, 8), (4, 32), (8, 64), (6, 64)]:
        for tokens in range(1, 2049):
            theirs = math.ceil(factor * top_k * (tokens / num_experts))
            assert capacity.expert_capacity(tokens, top_k, num_experts, factor) == max(1, theirs)


def test_where_their_double_precision_rounds_up_the_capacity_stays_exact():
    # 1.1 * 4 * (100 / 8) is 55 exactly; in doubles it is 55.00000000000001, which their ceil makes 56
    assert math.ceil(1.1 * 4 * (100 / 8)) == 56
    assert capacity.expert_capacity(100, 4, 8, 1.1) == 55
