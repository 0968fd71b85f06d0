"""Capacity-aware policies (papers.md A) against brute-force references in plain Python/numpy."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import moejax
from moejax import capacity, placement
from moejax.generate import pad_prompts
from tests.tiny import tiny_config


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _random_routing(seed, tokens=20, experts=5, k=2):
    rs = np.random.RandomState(seed)
    scores = _softmax(rs.randn(tokens, experts) * 2).astype(np.float32)
    top = np.argsort(-scores, axis=-1)[:, :k].astype(np.int32)
    return rs, scores, top


def token_drop_brute_force(scores, experts, cap, strategy, keep_in):
    t_count, k = experts.shape
    keep = np.zeros_like(keep_in)
    for e in range(scores.shape[1]):
        pairs = [(t, j) for t, j in itertools.product(range(t_count), range(k)) if experts[t, j] == e and keep_in[t, j]]
        if strategy == "score":
            pairs.sort(key=lambda p: (-scores[p[0], e], p[0]))
        elif strategy == "first":
            pairs.sort(key=lambda p: p[0])
        elif strategy == "last":
            pairs.sort(key=lambda p: -p[0])
        for t, j in pairs[:cap]:
            keep[t, j] = True
    return keep


@pytest.mark.parametrize("strategy", ["score", "first", "last"])
@pytest.mark.parametrize("cap", [1, 3, 7])
def test_token_drop_matches_brute_force(strategy, cap):
    rs = np.random.RandomState(cap)
    scores = _softmax(rs.randn(20, 5) * 2).astype(np.float32)
    scores[3, :] = scores[4, :]  # an exact tie: the lower token wins
    experts = np.argsort(-scores, axis=-1)[:, :2].astype(np.int32)
    keep_in = rs.rand(20, 2) > 0.1  # some pairs already dropped (e.g. padding)
    keep = capacity.token_drop(jnp.asarray(scores), jnp.asarray(experts), cap, strategy, keep=jnp.asarray(keep_in))
    np.testing.assert_array_equal(np.asarray(keep), token_drop_brute_force(scores, experts, cap, strategy, keep_in))


def test_random_drop_respects_capacity():
    scores = jnp.asarray(_softmax(np.random.RandomState(2).randn(40, 4)), jnp.float32)
    experts = jnp.argsort(-scores, axis=-1)[:, :2].astype(jnp.int32)
    keep = np.asarray(capacity.token_drop(scores, experts, 6, "random", key=jax.random.key(0)))
    counts = np.bincount(np.asarray(experts)[keep], minlength=4)
    full = np.bincount(np.asarray(experts).ravel(), minlength=4)
    np.testing.assert_array_equal(counts, np.minimum(full, 6))


def test_expert_capacity_formula_and_errors():
    assert capacity.expert_capacity(100, 2, 8, 1.0) == 25
    assert capacity.expert_capacity(10, 2, 8, 1.5) == 4  # ceil(3.75)
    assert capacity.expert_capacity(1, 1, 64, 1.0) == 1
    with pytest.raises(ValueError, match="factor=0"):
        capacity.expert_capacity(10, 2, 8, 0)
    # capacity groups may be fewer than k: devices under scope="device" (C_dev = ceil(gamma * T * k / D))
    assert capacity.expert_capacity(6, 2, 1, 1.0) == 12 and capacity.expert_capacity(5, 8, 2, 0.5) == 10
    with pytest.raises(ValueError, match="capacity_factor=-1"):
        moejax.MoEPolicy(capacity_factor=-1)
    with pytest.raises(ValueError, match="unknown drop strategy 'lowest'"):
        moejax.MoEPolicy(capacity_factor=1.0, drop="lowest")


# gamma as an exact fraction (numerator, denominator) beside the float a user writes. The non-dyadic ones
# land T * k * gamma / E on exact integers that float32 arithmetic misses (k=4, E=32, T=100, 1.2: 15, not 16).
FACTORS = {0.3: (3, 10), 0.6: (3, 5), 1.1: (11, 10), 1.2: (6, 5), 1.25: (5, 4), 1.5: (3, 2), 2.4: (12, 5)}


def capacity_reference(tokens, top_k, groups, factor):
    numerator, denominator = FACTORS[factor]
    return max(1, -(-numerator * top_k * tokens // (denominator * groups)))  # integer ceil


@pytest.mark.parametrize("factor", sorted(FACTORS))
def test_capacity_is_exact_on_host_and_traced_alike(factor):
    counts = np.arange(257)
    traced_off_by_one = 0
    for top_k, groups in [(1, 8), (2, 8), (4, 8), (2, 16), (4, 32), (8, 64)]:
        reference = [capacity_reference(int(t), top_k, groups, factor) for t in counts]
        host = [capacity.expert_capacity(int(t), top_k, groups, factor) for t in counts]
        traced = jax.jit(jax.vmap(lambda t: capacity.expert_capacity(t, top_k, groups, factor, max_tokens=256)))(
            jnp.asarray(counts, jnp.int32))
        assert host == reference
        np.testing.assert_array_equal(np.asarray(traced), reference)
        # the float32 formula the traced capacity had before
        float32 = np.maximum(1, np.ceil(np.float32(factor * top_k) * counts.astype(np.float32) / np.float32(groups)))
        traced_off_by_one += int((float32 != reference).sum())
    # the sweep covers the products where float32 rounds up, for every factor that has them
    assert traced_off_by_one > 0 or factor in (1.1, 1.25, 1.5)


def test_capacity_past_int32_products_is_still_exact():
    """A factor with many digits makes numerator * tokens overflow int32; the capacity stays exact."""
    factor, top_k, groups = 1.2345678, 2, 8
    assert (capacity.exact_factor(factor) * top_k / groups).numerator * 512 > 2**31
    counts = np.arange(513)
    traced = jax.jit(jax.vmap(lambda t: capacity.expert_capacity(t, top_k, groups, factor, max_tokens=512)))(
        jnp.asarray(counts, jnp.int32))
    reference = [max(1, -(-12345678 * top_k * int(t) // (10**7 * groups))) for t in counts]
    np.testing.assert_array_equal(np.asarray(traced), reference)
    assert [capacity.expert_capacity(int(t), top_k, groups, factor) for t in counts] == reference


@pytest.mark.parametrize("tokens, top_k, experts, factor, devices", [
    (100, 4, 32, 1.2, None),  # the issue's: C = 15 (float32 said 16)
    (100, 4, 16, 0.6, None),  # 15 (16)
    (200, 2, 16, 0.6, None),  # 15 (16)
    (100, 4, 32, 0.6, 8),     # per device of 4 experts: C_dev = 30 (31)
])
def test_no_expert_keeps_more_than_expert_capacity_inside_a_forward(tokens, top_k, experts, factor, devices):
    """Products T * k * gamma / E on exact integers, T counting only real tokens of a padded batch: every expert
    (or device) keeps min(routed, C) pairs with C = expert_capacity, so those over it keep exactly C."""
    config = tiny_config(num_layers=1, moe_layers=(True,), num_experts=experts, num_experts_per_tok=top_k)
    scope = dict(scope="device", num_devices=devices) if devices else {}
    model = moejax.random_model(config, seed=0, policy=moejax.MoEPolicy(capacity_factor=factor, **scope))
    block = model.moe_blocks()[0]
    block.router[...] = block.router[...] * 10  # uneven loads: some experts over capacity
    mask = (np.arange((tokens // 64 + 1) * 64) < tokens).reshape(-1, 64)  # the last row padded
    ids = np.random.RandomState(0).randint(0, 64, size=mask.shape)
    r = model.forward(jnp.asarray(ids), token_mask=jnp.asarray(mask)).routings[0]
    experts_of_pairs, keep = np.asarray(r.experts), np.asarray(r.keep)
    group = experts_of_pairs if devices is None else placement.contiguous(experts, devices)[experts_of_pairs]
    groups = devices or experts
    cap = capacity.expert_capacity(tokens, top_k, groups, factor)
    assert cap == capacity_reference(tokens, top_k, groups, factor)
    routed = np.bincount(group[mask.reshape(-1)].ravel(), minlength=groups)
    kept = np.bincount(group[keep], minlength=groups)
    assert (routed > cap).any()
    np.testing.assert_array_equal(kept, np.minimum(routed, cap))


def expanded_drop_brute_force(scores, experts, cap, local):
    t_count, e_count = scores.shape
    keep = np.zeros((t_count, e_count), bool)
    for e in range(e_count):
        candidates = [t for t in range(t_count) if e in experts[t] or local[t, e]]
        for t in sorted(candidates, key=lambda t: (-scores[t, e], t))[:cap]:
            keep[t, e] = True
    return keep


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("cap", [1, 2, 5])
def test_expanded_drop_matches_brute_force(seed, cap):
    rs, scores, top = _random_routing(seed, tokens=16, experts=6, k=2)
    local = rs.rand(16, 6) > 0.6
    keep = capacity.expanded_drop(jnp.asarray(scores), jnp.asarray(top), cap, jnp.asarray(local))
    np.testing.assert_array_equal(np.asarray(keep), expanded_drop_brute_force(scores, top, cap, local))


@pytest.mark.parametrize("strategy", ["score", "first", "last", "random"])
@pytest.mark.parametrize("factor", [0.3, 0.75, 1.0])
def test_no_expert_or_device_exceeds_capacity(strategy, factor):
    rs, scores, top = _random_routing(7, tokens=40, experts=8, k=2)
    cap = capacity.expert_capacity(40, 2, 8, factor)
    keep = np.asarray(capacity.token_drop(jnp.asarray(scores), jnp.asarray(top), cap, strategy, key=jax.random.key(3)))
    per_expert = np.bincount(top[keep], minlength=8)
    routed = np.bincount(top.ravel(), minlength=8)
    np.testing.assert_array_equal(per_expert, np.minimum(routed, cap))  # drops only what is over capacity
    device_of_expert = placement.contiguous(8, 4)
    cap_dev = capacity.expert_capacity(40, 2, 4, factor)
    keep = np.asarray(capacity.token_drop(jnp.asarray(scores), jnp.asarray(top), cap_dev, strategy,
                                          key=jax.random.key(3), device_of_expert=device_of_expert))
    per_device = np.bincount(device_of_expert[top[keep]], minlength=4)
    routed_device = np.bincount(device_of_expert[top.ravel()], minlength=4)
    np.testing.assert_array_equal(per_device, np.minimum(routed_device, cap_dev))


def test_device_scope_keeps_the_highest_scores_of_each_device():
    _, scores, top = _random_routing(11, tokens=30, experts=8, k=2)
    device_of_expert = placement.contiguous(8, 4)
    keep = np.asarray(capacity.token_drop(jnp.asarray(scores), jnp.asarray(top), 5, "score",
                                          device_of_expert=device_of_expert))
    for d in range(4):
        pairs = [(t, j) for t in range(30) for j in range(2) if device_of_expert[top[t, j]] == d]
        best = sorted(pairs, key=lambda p: (-scores[p[0], top[p]], p[0]))[:5]
        assert {p for p in pairs if keep[p]} == set(best)


def _tokens(seed=0, shape=(2, 24)):
    return jnp.asarray(np.random.RandomState(seed).randint(0, 64, size=shape))


@pytest.fixture(scope="module")
def model():
    return moejax.random_model(tiny_config(num_experts=8, num_experts_per_tok=2), seed=2)


def test_capacity_large_enough_to_drop_nothing_equals_dropless(model):
    tokens = _tokens()
    for policy in (moejax.MoEPolicy(capacity_factor=4.0), moejax.MoEPolicy(capacity_factor=4.0, scope="device",
                                                                           num_devices=4)):
        out = moejax.with_policy(model, policy).forward(tokens)
        assert all(bool(r.keep.all()) for r in out.routings)
        np.testing.assert_array_equal(np.asarray(out.logits), np.asarray(model.forward(tokens).logits))


def test_token_that_lost_every_expert_passes_through_the_residual_only(model):
    block = moejax.with_policy(model, moejax.MoEPolicy(capacity_factor=0.1)).moe_blocks()[0]
    x = jnp.asarray(np.random.RandomState(0).randn(40, 32), jnp.float32)
    out, r, _ = block(x, jnp.ones(40, bool))
    lost = ~np.asarray(r.keep).any(-1)
    assert lost.sum() > 0 and (~lost).sum() > 0
    assert np.abs(np.asarray(out)[lost]).max() == 0.0
    assert np.abs(np.asarray(out)[~lost]).min(axis=-1).max() > 0


@pytest.mark.parametrize("policy", [moejax.MoEPolicy(capacity_factor=0.5, drop="first"),
                                    moejax.MoEPolicy(capacity_factor=0.5, drop="random"),
                                    moejax.MoEPolicy(capacity_factor=0.5, expanded="global")])
def test_padding_never_counts_toward_capacity(model, policy):
    """A prompt alone and the same prompt left-padded in a batch: identical drops, identical logits."""
    dropping = moejax.with_policy(model, policy)
    prompt = np.asarray(_tokens(1, (1, 13)))[0].tolist()
    alone = dropping.forward(jnp.asarray([prompt]))
    tokens, mask = pad_prompts([prompt], bucket=32)
    padded = dropping.forward(jnp.asarray(tokens), token_mask=jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(padded.logits)[0, mask[0]], np.asarray(alone.logits)[0], atol=1e-5)
    for a, p in zip(alone.routings, padded.routings):
        np.testing.assert_array_equal(np.asarray(p.keep)[mask[0]], np.asarray(a.keep))
        assert not np.asarray(p.keep)[~mask[0]].any()


@pytest.mark.parametrize("renormalize", ["none", "family"])
@pytest.mark.parametrize("expanded", ["local", "global"])
def test_expanded_drop_in_the_model(model, expanded, renormalize):
    """Every expert keeps its top-C candidates (top-k plus local experts) by score, weighted by the score;
    this family normalises its top-k, so by default the kept scores are normalised per token."""
    policy = moejax.MoEPolicy(capacity_factor=1.0, expanded=expanded, num_devices=4, renormalize=renormalize)
    tokens = _tokens(2)
    out = moejax.with_policy(model, policy).forward(tokens)
    t_count = tokens.size
    cap = capacity.expert_capacity(t_count, 2, 8, 1.0)
    device_of_expert = placement.contiguous(8, 4)
    token_device = placement.token_devices(t_count, 4)
    local = (device_of_expert[None, :] == token_device[:, None]) if expanded == "local" else np.ones((t_count, 8), bool)
    for r in out.routings:
        scores, experts, keep = (np.asarray(a) for a in (r.scores, r.experts, r.keep))
        dense = np.zeros((t_count, 8), bool)
        for t, j in zip(*np.nonzero(keep)):
            assert not dense[t, experts[t, j]]  # no pair kept twice
            dense[t, experts[t, j]] = True
        np.testing.assert_array_equal(dense, expanded_drop_brute_force(scores, experts[:, :2], cap, local))
        kept_scores = np.where(keep, np.take_along_axis(scores, experts, -1), 0.0)
        if renormalize == "family":
            kept_scores /= np.maximum(kept_scores.sum(-1, keepdims=True), 1e-30)
        np.testing.assert_allclose(np.asarray(r.weights)[keep], kept_scores[keep], rtol=1e-6)


def test_capacity_applies_in_decode_unless_switched_off(model):
    """Four identical rows decode the same token, so in a decode step every expert gets 4 pairs > C = 1."""
    from moejax.models.transformer import init_cache

    tokens = jnp.asarray([[1, 2, 3, 4]] * 4)
    tight = dict(capacity_factor=0.25, drop="first")
    for in_decode in (True, False):
        m = moejax.with_policy(model, moejax.MoEPolicy(**tight, in_decode=in_decode))
        prefill = m.forward(tokens, cache=init_cache(m.config, 4, 8, jnp.float32))
        assert not all(bool(r.keep.all()) for r in prefill.routings)  # prefill always drops here
        step = m.forward(jnp.argmax(prefill.logits[:, -1:], -1), cache=prefill.cache, decode=True)
        assert all(bool(r.keep.all()) for r in step.routings) == (not in_decode)


@pytest.mark.parametrize("kwargs, match", [
    (dict(capacity_factor=0.0), "capacity_factor=0.0 must be > 0"),
    (dict(capacity_factor=float("inf")), "capacity_factor=inf must be > 0 and finite"),
    (dict(capacity_factor=float("nan")), "capacity_factor=nan must be > 0 and finite"),
    (dict(capacity_factor="1.5"), "capacity_factor='1.5' must be > 0 and finite"),
    (dict(capacity_factor=1.0, renormalize="no"),
     r"unknown renormalize mode 'no'; supported: \('family', 'none', 'kept', 'routed_sum'\)"),
    (dict(capacity_factor=1.0, renormalize=None), "unknown renormalize mode None"),
    (dict(capacity_factor=1.0, renormalize="Kept"), "unknown renormalize mode 'Kept'"),
    (dict(capacity_factor=1.0, drop="fastest"), "unknown drop strategy 'fastest'"),
    (dict(capacity_factor=1.0, scope="node"), "unknown capacity scope 'node'"),
    (dict(capacity_factor=1.0, expanded="nearby"), "unknown expanded mode 'nearby'"),
    (dict(expanded="global"), "needs a capacity_factor"),
    (dict(capacity_factor=1.0, expanded="local", placement=(0.0, 1.0, 0.0, 1.0)), r"placement must be .*int device ids"),
    (dict(capacity_factor=1.0, expanded="local", num_devices=2.5), "num_devices=2.5 must be an integer"),
    (dict(capacity_factor=1.0, expanded="global", scope="device", num_devices=2),
     r"expanded='global' keeps each expert's top-C candidates by score; scope='device', drop='score' do not apply"),
    (dict(capacity_factor=1.0, expanded="local", drop="first", num_devices=2), r"scope='expert', drop='first' do not"),
])
def test_bad_policies(kwargs, match):
    with pytest.raises(ValueError, match=match):
        moejax.MoEPolicy(**kwargs)


@pytest.mark.parametrize("kwargs", [dict(capacity_factor=1.0, expanded="local"),
                                    dict(capacity_factor=1.0, scope="device")])
def test_policies_that_need_a_layout_refuse_a_model_without_one(model, kwargs):
    with pytest.raises(ValueError, match="needs a placement"):
        moejax.with_policy(model, moejax.MoEPolicy(**kwargs))


def test_random_drop_differs_across_seeds_and_batches_and_repeats_on_the_same_batch(model):
    tokens = _tokens()
    keeps = {}
    for seed in (0, 1):
        out = moejax.with_policy(model, moejax.MoEPolicy(capacity_factor=0.5, drop="random", seed=seed)).forward(tokens)
        keeps[seed] = [np.asarray(r.keep) for r in out.routings if r is not None]
    again = moejax.with_policy(model, moejax.MoEPolicy(capacity_factor=0.5, drop="random", seed=0)).forward(tokens)
    assert all(np.array_equal(a, np.asarray(r.keep)) for a, r in zip(keeps[0], again.routings))
    assert not all(np.array_equal(a, b) for a, b in zip(keeps[0], keeps[1]))
    # the key folds in the batch (its real tokens' routing) and the layer, so another batch gets other
    # priorities, and padding or last-bit noise in the logits none
    policy = moejax.MoEPolicy(capacity_factor=0.5, drop="random")
    logits = jnp.asarray(np.random.RandomState(0).randn(8, 4), jnp.float32)
    draw = lambda layer, l, mask=None: np.asarray(jax.random.uniform(capacity.drop_key(policy, layer, l, mask), (16,)))
    assert np.array_equal(draw(0, logits), draw(0, logits))
    assert np.array_equal(draw(0, logits), draw(0, logits * (1 + 1e-7)))
    padded = jnp.concatenate([jnp.asarray(np.random.RandomState(1).randn(3, 4), jnp.float32), logits])
    assert np.array_equal(draw(0, logits), draw(0, padded, jnp.arange(11) >= 3))
    assert not np.array_equal(draw(0, logits), draw(0, logits[::-1]))
    assert not np.array_equal(draw(0, logits), draw(1, logits))


def test_placement_must_fit_the_model(model):
    policy = moejax.MoEPolicy(capacity_factor=1.0, expanded="local", placement=(0, 0, 1, 1, 2, 2))
    with pytest.raises(ValueError, match="placement has 6 entries but the model has 8 experts"):
        moejax.with_policy(model, policy).forward(_tokens())


# ---------------------------------------------------------------------------------------------------------
# Renormalisation of the kept weights


def _swiglu(x, wg, wu, wd):
    g = x @ wg
    return ((g / (1 + np.exp(-g))) * (x @ wu)) @ wd


def renormalised_reference(block, x, token_mask, factor, mode):
    """Plain numpy: route, drop by score with C = ceil(gamma * T * k / E), rescale each token's kept weights as
    `mode` says, combine. -> experts [N, k], keep [N, k], routed weights [N, k], weights [N, k] (0 where
    dropped), output [N, d]."""
    c = block.config
    x = np.asarray(x, np.float64)
    scores = _softmax(x @ np.asarray(block.router[...], np.float64))
    experts = np.argsort(-scores, axis=-1, kind="stable")[:, :c.num_experts_per_tok]
    probs = np.take_along_axis(scores, experts, -1)
    routed = probs / probs.sum(-1, keepdims=True) if c.norm_topk_prob else probs
    real = np.broadcast_to(np.asarray(token_mask)[:, None], experts.shape)
    cap = capacity.expert_capacity(int(np.sum(token_mask)), c.num_experts_per_tok, c.num_experts, factor)
    keep = token_drop_brute_force(scores, experts, cap, "score", real.copy())
    kept_sum = lambda w: np.maximum(np.where(keep, w, 0).sum(-1, keepdims=True), 1e-30)
    if mode == "family":
        mode = "kept" if c.norm_topk_prob else "none"
    weights = {"none": routed, "kept": probs / kept_sum(probs),
               "routed_sum": routed * routed.sum(-1, keepdims=True) / kept_sum(routed)}[mode]
    weights = np.where(keep, weights, 0.0)
    wg, wu, wd = (np.asarray(w[...], np.float64) for w in (block.w_gate, block.w_up, block.w_down))
    out = np.zeros_like(x)
    for t, j in zip(*np.nonzero(keep)):
        e = experts[t, j]
        out[t] += weights[t, j] * _swiglu(x[t], wg[e], wu[e], wd[e])
    return experts, keep, routed, weights, out


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A norm_topk_prob=True (Mixtral) and a norm_topk_prob=False (OLMoE) checkpoint, routers made decisive."""
    paths = {}
    for family, fields in {"mixtral": dict(), "olmoe": dict(qk_norm=True, norm_topk_prob=False)}.items():
        model = moejax.random_model(tiny_config(architecture=family, num_experts=8, num_experts_per_tok=2,
                                                intermediate_size=24, **fields), seed=4)
        for block in model.moe_blocks():
            block.router[...] = block.router[...] * 10
        paths[family] = str(tmp_path_factory.mktemp(family))
        moejax.export_pretrained(model, paths[family])
    return paths


@pytest.mark.parametrize("family", ["mixtral", "olmoe"])
@pytest.mark.parametrize("mode", ["family", "none", "kept", "routed_sum"])
def test_renormalize_modes_match_a_numpy_reference(checkpoints, family, mode):
    factor = 0.75
    model = moejax.load_pretrained(checkpoints[family], policy=moejax.MoEPolicy(capacity_factor=factor,
                                                                                renormalize=mode))
    assert model.config.norm_topk_prob == (family == "mixtral")
    block = model.moe_blocks()[0]
    rs = np.random.RandomState(1)
    x = jnp.asarray(rs.randn(40, 32), jnp.float32)
    token_mask = jnp.asarray(rs.rand(40) > 0.15)
    out, r, _ = jax.jit(lambda x, m: block(x, m))(x, token_mask)
    experts, keep, routed, weights, ref = renormalised_reference(block, x, token_mask, factor, mode)
    np.testing.assert_array_equal(np.asarray(r.experts), experts)
    np.testing.assert_array_equal(np.asarray(r.keep), keep)
    np.testing.assert_allclose(np.where(keep, np.asarray(r.weights), 0.0), weights, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5)
    # what tells the modes apart, on the tokens that lost one of their two experts
    partial = keep.sum(-1) == 1
    assert partial.any()
    sums, routed_sums = weights[partial].sum(-1), routed[partial].sum(-1)
    resolved = {"family": "kept" if family == "mixtral" else "none"}.get(mode, mode)
    if resolved == "kept":
        np.testing.assert_allclose(sums, 1.0, rtol=1e-6)
    elif resolved == "routed_sum":
        np.testing.assert_allclose(sums, routed_sums, rtol=1e-6)
    else:
        assert (sums < routed_sums - 1e-3).all()
    if family == "olmoe":  # where the family does not normalise, "kept" and "routed_sum" differ
        assert (routed_sums < 1 - 1e-3).all()


def test_family_default_is_the_old_default_where_the_family_does_not_normalise(checkpoints):
    """OLMoE (the committed default model's family): the default renormalises nothing, as before the modes."""
    tokens = _tokens(3, (2, 20))
    logits = {}
    for mode in ("family", "none", False):
        model = moejax.load_pretrained(checkpoints["olmoe"], policy=moejax.MoEPolicy(capacity_factor=0.5,
                                                                                      renormalize=mode))
        logits[mode] = np.asarray(model.forward(tokens).logits)
    np.testing.assert_array_equal(logits["family"], logits["none"])
    np.testing.assert_array_equal(logits["family"], logits[False])


def test_renormalize_booleans_are_the_modes_they_meant():
    assert moejax.MoEPolicy(renormalize=False).renormalize == "none"
    assert moejax.MoEPolicy(renormalize=True).renormalize == "routed_sum"
    assert moejax.MoEPolicy().renormalize == "family"
    assert moejax.MoEPolicy().renormalization(norm_topk_prob=True) == "kept"
    assert moejax.MoEPolicy().renormalization(norm_topk_prob=False) == "none"
    assert moejax.MoEPolicy(renormalize="routed_sum").renormalization(norm_topk_prob=False) == "routed_sum"


def test_device_capacity_holds_for_more_choices_than_devices():
    """C_dev = ceil(gamma * T * k / D) is defined for any k and D (papers.md A): top-4 of 8 on 2 devices."""
    rng = np.random.RandomState(3)
    scores = jnp.asarray(_softmax(rng.randn(10, 8)), jnp.float32)
    routing_ = moejax.routing.route(jnp.log(scores), 4)
    policy = moejax.MoEPolicy(capacity_factor=0.5, scope="device", num_devices=2)
    keep = np.asarray(capacity.apply_policy(routing_, policy, num_tokens=10).keep)
    device = np.asarray(routing_.experts) // 4
    c_dev = -(-(0.5 * 10 * 4) // 2)  # 10 per device
    for d in range(2):  # each device keeps its c_dev highest-scored pairs
        pairs = [(-float(scores[t, e]), t) for t, e in zip(*np.nonzero(device == d)) for e in [routing_.experts[t, e]]]
        kept = sorted(zip(*np.nonzero((device == d) & keep)))
        assert len(kept) == min(len(pairs), c_dev)
        expected = sorted(sorted(zip(*np.nonzero(device == d)), key=lambda tc: (-float(scores[tc[0], routing_.experts[tc]]),
                                                                            tc[0]))[:int(c_dev)])
        assert kept == expected


def test_expanded_drop_keeps_the_routed_scaling_factor():
    """DeepSeek-V2's router (no top-k normalisation, routed_scaling_factor 16): a capacity that drops nothing
    leaves each token's routed pairs with the weights it was routed with, under expanded drop as under token
    drop."""
    logits = jax.random.normal(jax.random.key(0), (4, 8))
    routed = moejax.routing.route(logits, 2, norm_topk_prob=False, routed_scaling_factor=16.0)
    for policy in (moejax.MoEPolicy(capacity_factor=100.0), moejax.MoEPolicy(capacity_factor=100.0, expanded="global"),
                   moejax.MoEPolicy(capacity_factor=100.0, expanded="local", num_devices=4)):
        out = capacity.apply_policy(routed, policy, num_tokens=4, norm_topk_prob=False, routed_scaling_factor=16.0)
        np.testing.assert_allclose(np.asarray(out.weights)[:, :2], np.asarray(routed.weights), rtol=1e-6)
