"""Route -> policy -> dispatch -> experts -> combine, each against a brute-force numpy reference."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import moejax
from moejax import capacity, dispatch, routing
from tests.test_capacity import token_drop_brute_force
from tests.tiny import tiny_config


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_group_limited_routing_matches_brute_force():
    rs = np.random.RandomState(0)
    logits = rs.randn(50, 12).astype(np.float32) * 3
    r = routing.route(jnp.asarray(logits), 3, topk_method="group_limited_greedy", n_group=4, topk_group=2,
                      routed_scaling_factor=1.5)
    scores = _softmax(logits)
    for t in range(50):
        groups = scores[t].reshape(4, 3).max(-1)
        best_groups = np.argsort(-groups)[:2]
        allowed = [e for e in range(12) if e // 3 in best_groups]
        best = sorted(allowed, key=lambda e: -scores[t, e])[:3]
        assert sorted(np.asarray(r.experts[t]).tolist()) == sorted(best)
        np.testing.assert_allclose(np.sort(np.asarray(r.weights[t])), np.sort(scores[t, best] * 1.5), rtol=1e-5)


def test_norm_topk_prob_renormalises():
    logits = jnp.asarray(np.random.RandomState(1).randn(8, 6), jnp.float32)
    r = routing.route(logits, 2, norm_topk_prob=True)
    np.testing.assert_allclose(np.asarray(r.weights.sum(-1)), 1.0, rtol=1e-6)


def _block_brute_force(block, x, token_mask):
    """Per token: sum over kept experts of weight * SwiGLU expert(x), from plain numpy loops."""
    c = block.config
    x = np.asarray(x, np.float64)
    scores = _softmax(x @ np.asarray(block.router[...]))
    wg, wu, wd = (np.asarray(w[...], np.float64) for w in (block.w_gate, block.w_up, block.w_down))
    experts = np.argsort(-scores, axis=-1, kind="stable")[:, :c.num_experts_per_tok]
    weights = np.take_along_axis(scores, experts, -1)
    weights /= weights.sum(-1, keepdims=True)  # mixtral normalises
    keep = np.broadcast_to(np.asarray(token_mask)[:, None], experts.shape).copy()
    if not block.policy.dropless:
        cap = capacity.expert_capacity(int(np.sum(token_mask)), c.num_experts_per_tok, c.num_experts,
                                       block.policy.capacity_factor)
        keep = token_drop_brute_force(scores, experts, cap, block.policy.drop, keep)
        # mixtral normalises its top-k, so the default renormalize="family" normalises over the kept experts
        kept = np.where(keep, weights, 0.0).sum(-1, keepdims=True)
        weights = weights / np.where(kept > 0, kept, 1.0)
    out = np.zeros_like(x)
    for t, j in itertools.product(range(x.shape[0]), range(experts.shape[1])):
        if keep[t, j]:
            e = experts[t, j]
            g = x[t] @ wg[e]
            h = (g / (1 + np.exp(-g))) * (x[t] @ wu[e])
            out[t] += weights[t, j] * (h @ wd[e])
    return out, keep


@pytest.mark.parametrize("policy", [moejax.MoEPolicy(), moejax.MoEPolicy(capacity_factor=1.0),
                                    moejax.MoEPolicy(capacity_factor=0.5, drop="first")])
def test_moe_block_matches_brute_force(policy):
    model = moejax.random_model(tiny_config(num_experts=6, num_experts_per_tok=2), seed=0, policy=policy)
    block = model.moe_blocks()[0]
    block.router[...] = block.router[...] * 30
    rs = np.random.RandomState(0)
    x = jnp.asarray(rs.randn(24, 32), jnp.float32)
    token_mask = jnp.asarray(rs.rand(24) > 0.2)
    out, r, _ = jax.jit(lambda x, m: block(x, m))(x, token_mask)
    ref, ref_keep = _block_brute_force(block, x, token_mask)
    np.testing.assert_array_equal(np.sort(np.asarray(r.keep), -1), np.sort(ref_keep, -1))
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5)
    # padding tokens take no expert slot and produce nothing
    assert not np.asarray(r.keep)[~np.asarray(token_mask)].any()
    assert np.abs(np.asarray(out)[~np.asarray(token_mask)]).max() == 0


def test_dispatch_groups_rows_by_expert():
    x = jnp.arange(5 * 3, dtype=jnp.float32).reshape(5, 3)
    experts = jnp.asarray([[2, 0], [1, 2], [0, 3], [2, 1], [3, 0]], jnp.int32)
    keep = jnp.asarray([[1, 1], [1, 0], [1, 1], [1, 1], [0, 0]], bool)
    r = routing.Routing(jnp.zeros((5, 4)), experts, jnp.ones((5, 2)), keep)
    sent = dispatch.dispatch(x, r)
    np.testing.assert_array_equal(np.asarray(sent.group_sizes), [2, 2, 2, 1])
    tokens_in_order = np.asarray(sent.order)[:7] // 2
    np.testing.assert_array_equal(tokens_in_order, [0, 2, 1, 3, 0, 3, 2])  # stable within each expert
    np.testing.assert_array_equal(np.asarray(sent.rows)[:7], np.asarray(x)[tokens_in_order])


def test_with_policy_shares_parameters_and_changes_outputs():
    model = moejax.random_model(tiny_config(), seed=1)
    tokens = jnp.asarray(np.random.RandomState(0).randint(0, 64, size=(2, 16)))
    dropping = moejax.with_policy(model, moejax.MoEPolicy(capacity_factor=0.25))
    assert all(b.policy.capacity_factor == 0.25 for b in dropping.moe_blocks())
    assert all(b.policy.dropless for b in model.moe_blocks())
    assert dropping.embed_tokens[...] is model.embed_tokens[...]
    out = dropping.forward(tokens)
    kept = sum(int(r.keep.sum()) for r in out.routings)
    assert kept < 2 * 32 * 2  # capacity 0.25 drops pairs
    assert not np.allclose(np.asarray(out.logits), np.asarray(model(tokens)))
