"""Route -> policy -> dispatch -> experts -> combine, each against a brute-force numpy reference."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

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
            out[t] += weights[t, j] * _expert_brute_force(block, experts[t, j], x[t])
    return out, keep


def _expert_brute_force(block, e, x):
    """Expert e of the block on one token x [d], in float64: gated or not, biases or not, SwiGLU, GPT-OSS's
    clamped SwiGLU (its transformers code written out) or a plain activation."""
    c = block.config
    w = {name: None if v is None else np.asarray(v[...], np.float64)[e]
         for name, v in block.expert_variables()._asdict().items()}
    plus = lambda y, b: y if b is None else y + b
    up = plus(x @ w["up"], w["up_bias"])
    act = {"silu": lambda g: g / (1 + np.exp(-g)), "relu": lambda g: np.maximum(g, 0),
           "gelu": lambda g: np.asarray(jax.nn.gelu(g, approximate=False))}[c.hidden_act]
    if w["gate"] is None:
        hidden = act(up)
    else:
        gate = plus(x @ w["gate"], w["gate_bias"])
        if c.swiglu_limit is not None:
            gate, up = np.minimum(gate, c.swiglu_limit), np.clip(up, -c.swiglu_limit, c.swiglu_limit)
            hidden = (up + 1) * gate / (1 + np.exp(-1.702 * gate))
        else:
            hidden = act(gate) * up
    return plus(hidden @ w["down"], w["down_bias"])


@pytest.mark.parametrize("policy", [moejax.MoEPolicy(), moejax.MoEPolicy(capacity_factor=1.0),
                                    moejax.MoEPolicy(capacity_factor=0.5, drop="first")])
def test_moe_block_matches_brute_force(policy):
    model = moejax.random_model(tiny_config(num_experts=6, num_experts_per_tok=2), seed=0, policy=policy)
    block = model.moe_blocks()[0]
    block.router[...] = block.router[...] * 30
    _check_block_against_brute_force(block, atol=1e-5)


def _check_block_against_brute_force(block, atol):
    """The block under jit on 24 random tokens (some padding) against _block_brute_force: the pairs kept,
    the output; padding tokens take no expert slot and produce nothing. -> the reference output."""
    rs = np.random.RandomState(0)
    x = jnp.asarray(rs.randn(24, 32), jnp.float32)
    token_mask = jnp.asarray(rs.rand(24) > 0.2)
    out, r, _ = jax.jit(lambda x, m: block(x, m))(x, token_mask)
    ref, ref_keep = _block_brute_force(block, x, token_mask)
    np.testing.assert_array_equal(np.sort(np.asarray(r.keep), -1), np.sort(ref_keep, -1))
    np.testing.assert_allclose(np.asarray(out), ref, atol=atol, rtol=1e-5)
    assert not np.asarray(r.keep)[~np.asarray(token_mask)].any()
    assert np.abs(np.asarray(out)[~np.asarray(token_mask)]).max() == 0
    return ref


# The routed-expert FFNs beyond the gated SwiGLU (ModelConfig.moe_gated / moe_bias / swiglu_limit)
FFN_KINDS = {"switch-non-gated": dict(moe_gated=False, hidden_act="relu"),
             "nllb-non-gated-biases": dict(moe_gated=False, moe_bias=True, hidden_act="gelu"),
             "gpt_oss-clamped-biases": dict(moe_bias=True, swiglu_limit=0.7)}


def _kind_model(kind, policy=None):
    model = moejax.random_model(tiny_config(num_experts=8, num_experts_per_tok=2, **FFN_KINDS[kind]), seed=0,
                                policy=policy)
    for block in model.moe_blocks():
        block.router[...] = block.router[...] * 30  # decisive routing
        for w in block.expert_variables():
            if w is not None:
                w[...] = w[...] * 10  # the experts dominate the residual stream, and pass the clamp's limit
    return model


@pytest.mark.parametrize("kind", FFN_KINDS)
@pytest.mark.parametrize("policy", [moejax.MoEPolicy(), moejax.MoEPolicy(capacity_factor=0.5, drop="first")])
def test_every_ffn_kind_of_moe_block_matches_brute_force(kind, policy):
    ref = _check_block_against_brute_force(_kind_model(kind, policy).moe_blocks()[0], atol=1e-4)
    assert np.abs(ref).max() > 1


def _backends():
    """name -> the model with that experts backend, each computing every pair (no drop) of TOKENS."""
    from moejax import buffering, parallel
    from moejax.experts import CapacityBuffers, Resident
    from moejax.models import with_experts

    mesh = parallel.make_mesh
    return {
        "resident-ragged_dot": lambda m: with_experts(m, Resident("ragged_dot")),
        "resident-reference": lambda m: with_experts(m, Resident("reference")),
        "resident-pallas-falls-through": lambda m: with_experts(m, Resident(("pallas_interpret", "ragged_dot"))),
        "capacity_buffers": lambda m: with_experts(m, CapacityBuffers(capacity_factor=8.0)),  # 8 = E / k: room for all
        "expert_parallel-dynamic": lambda m: parallel.expert_parallel(m, mesh()),
        "expert_parallel-dynamic-bucket": lambda m: parallel.expert_parallel(m, mesh(), bucket=4),
        "expert_parallel-static": lambda m: parallel.expert_parallel(m, mesh(), "static", capacity_fraction=1.0),
        "buffered": lambda m: buffering.buffered(m, cache_size=3),
    }


TOKENS = jnp.asarray(np.random.RandomState(0).randint(0, 64, size=(2, 9)))
_forward = nnx.jit(lambda m, t: m.forward(t))


@pytest.mark.parametrize("backend", list(_backends()))
@pytest.mark.parametrize("kind", FFN_KINDS)
def test_every_ffn_kind_through_every_backend_equals_resident(kind, backend):
    model = _kind_model(kind)
    ref = _forward(model, TOKENS)
    out = _forward(_backends()[backend](model), TOKENS)
    assert all(bool(r.keep.all()) for r in out.routings)  # every pair computed (dynamic: the bucket fit)
    assert int(out.needed_bucket) <= 4 or backend != "expert_parallel-dynamic-bucket"
    np.testing.assert_allclose(np.asarray(out.logits), np.asarray(ref.logits), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", FFN_KINDS)
def test_int8_buffered_copies_of_every_ffn_kind_compute_with_their_dequantized_weights(kind):
    """Every demand miss copies the int8 expert (each leaf, biases too): the logits are those of the resident
    model whose expert weights are the dequantized copies."""
    from moejax import buffering

    model = _kind_model(kind)
    dequantized = nnx.clone(model)
    for block in dequantized.moe_blocks():
        for w in block.expert_variables():
            if w is not None:
                q, scales = buffering.slots.quantize_int8(w[...])
                w[...] = (q.astype(jnp.float32) * scales).astype(w[...].dtype)
    out = _forward(buffering.buffered(model, cache_size=3, low_precision="int8"), TOKENS)
    np.testing.assert_allclose(np.asarray(out.logits), np.asarray(_forward(dequantized, TOKENS).logits),
                               atol=1e-5, rtol=0)
    per_expert = sum(w[0].nbytes for w in jax.tree.leaves(model.moe_blocks()[0].expert_weights()))
    assert buffering.expert_bytes(model) == per_expert  # biases counted


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


def _split_backends():
    """name -> the split model with that experts backend: the xla switch over each expert's own arrays, and
    implementations that take them stacked (ragged_dot, capacity buffers: training's)."""
    from moejax.experts import CapacityBuffers, Resident
    from moejax.models import with_experts

    return {"resident-auto": lambda m: m,
            "resident-ragged_dot": lambda m: with_experts(m, Resident("ragged_dot")),
            "capacity_buffers": lambda m: with_experts(m, CapacityBuffers(capacity_factor=8.0))}


@pytest.mark.parametrize("kind", ["mixtral-gated", *FFN_KINDS])
def test_split_experts_of_every_ffn_kind_equal_the_stacked_ones(kind):
    model = moejax.random_model(tiny_config(num_experts=8), seed=2) if kind == "mixtral-gated" else _kind_model(kind)
    split = moejax.with_expert_storage(model, "split")
    assert [b.expert_storage for b in split.moe_blocks()] == ["split", "split"]
    ref = np.asarray(_forward(model, TOKENS).logits)
    for name, backend in _split_backends().items():
        out = _forward(backend(split), TOKENS)
        np.testing.assert_allclose(np.asarray(out.logits), ref, atol=1e-5, rtol=0, err_msg=name)


def test_with_expert_storage_returns_a_new_model_sharing_the_rest():
    from moejax import buffering

    model = moejax.random_model(tiny_config(moe_bias=True), seed=1)
    split = moejax.with_expert_storage(model, "split")
    assert all(b.expert_storage == "stacked" for b in model.moe_blocks())  # the caller's model as it was
    assert split.embed_tokens[...] is model.embed_tokens[...]
    block, original = split.moe_blocks()[1], model.moe_blocks()[1]
    assert len(block.w_down) == 4 and block.w_down[3][...].shape == (24, 32) and block.up_bias[2][...].shape == (24,)
    np.testing.assert_array_equal(np.asarray(block.w_down[3][...]), np.asarray(original.w_down[...][3]))
    assert buffering.expert_bytes(split) == buffering.expert_bytes(model)
    back = moejax.with_expert_storage(split, "stacked")
    assert all(b.expert_storage == "split" for b in split.moe_blocks())
    for got, want in zip(jax.tree.leaves(nnx.state(back, nnx.Param)), jax.tree.leaves(nnx.state(model, nnx.Param))):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    with pytest.raises(ValueError, match=r"unknown expert_storage 'rows'; supported: \('stacked', 'split'\)"):
        moejax.with_expert_storage(model, "rows")


def test_expert_parallelism_of_split_experts_splits_each_devices_local_experts():
    from moejax import parallel

    model = moejax.random_model(tiny_config(num_experts=8, moe_bias=True), seed=0)
    split = moejax.with_expert_storage(model, "split")
    for mesh in (parallel.make_mesh(), parallel.make_mesh(expert=4, data=2), parallel.make_mesh(expert=2, data=4)):
        placement = np.array([3, 6, 1, 0, 7, 2, 5, 4]) % mesh.shape["expert"]  # device of each expert
        sharded = parallel.expert_parallel(split, mesh, placement=placement)
        block = sharded.moe_blocks()[0]
        local = 8 // mesh.shape["expert"]
        assert block.expert_storage == "split" and len(block.w_up) == local
        assert block.w_up[0][...].shape == (mesh.shape["expert"], *model.moe_blocks()[0].w_up[...].shape[1:])
        np.testing.assert_allclose(np.asarray(_forward(sharded, TOKENS).logits),
                                   np.asarray(_forward(model, TOKENS).logits), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="layer 0 is expert-parallel: choose the expert storage before"):
        moejax.with_expert_storage(sharded, "stacked")


def test_what_takes_stacked_experts_refuses_split_ones():
    from moejax import buffering, parallel

    split = moejax.with_expert_storage(moejax.random_model(tiny_config(num_experts=8), seed=0), "split")
    fix = r"layer 0 holds each expert's weights split .* moejax.with_expert_storage\(model, 'stacked'\)"
    with pytest.raises(ValueError, match="buffering needs the routed experts stacked; " + fix):
        buffering.buffered(split, cache_size=3)
    with pytest.raises(ValueError, match="moving or replacing the experts' parameters needs the routed experts"):
        split.moe_blocks()[0].expert_variables()
    sharded = parallel.expert_parallel(moejax.random_model(tiny_config(num_experts=8), seed=0), parallel.make_mesh())
    with pytest.raises(ValueError, match="layer 0 is expert-parallel: choose the expert storage before"):
        moejax.with_expert_storage(sharded, "split")
