"""Expert placement (papers.md B) against hand-worked examples, brute force and plain numpy; placements used
for real on the 8-device expert-parallel CPU mesh."""

import itertools

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import moejax
from moejax import parallel, stats
from moejax import placement as pl
from tests.tiny import decisive_model, expert_mesh


# ---------------------------------------------------------------------------------------------------------
# greedy and anti-correlation


def test_greedy_hand_worked_example():
    # order 0 (5), 2 (4), 4 (3), 5 (3), 3 (2), 1 (1); device sums after each: (5,0) (5,4) (5,7) (8,7) (8,9);
    # device 1 is then full (3 experts), so expert 1 goes to device 0
    np.testing.assert_array_equal(pl.greedy([5, 1, 4, 2, 3, 3], 2), [0, 0, 1, 1, 1, 0])
    np.testing.assert_array_equal(pl.greedy([1, 1, 1, 1], 2), [0, 1, 0, 1])  # ties: lower expert, lower device
    np.testing.assert_array_equal(pl.greedy([10, 1, 1, 1], 2), [0, 1, 1, 0])  # E/D cap overrides the load


def _paper_rule(loads, num_devices, correlation=None, weight=0.0):
    """papers.md B written out with Python lists: greedy (weight 0) or anti-correlation."""
    e = len(loads)
    order = sorted(range(e), key=lambda x: (-loads[x], x))
    on = [[] for _ in range(num_devices)]
    out = [None] * e
    for a in order:
        best = None
        for d in range(num_devices):
            if len(on[d]) < e // num_devices:
                score = sum(loads[m] + (weight * correlation[a][m] if weight else 0.0) for m in on[d])
                if best is None or score < best[0] - 1e-12:
                    best = (score, d)
        on[best[1]].append(a)
        out[a] = best[1]
    return out


@pytest.mark.parametrize("seed", range(4))
def test_greedy_and_anti_correlation_follow_the_paper_rule(seed):
    rng = np.random.default_rng(seed)
    batch = rng.dirichlet(np.full(12, 0.3), size=20) * 2  # fractions of tokens, top-2
    mean = batch.mean(0)
    np.testing.assert_array_equal(pl.greedy(mean, 3), _paper_rule(mean.tolist(), 3))
    s = np.corrcoef(batch.T)
    np.testing.assert_allclose(pl.correlation(batch), s, atol=1e-12)
    np.testing.assert_array_equal(pl.anti_correlation(batch, 4), _paper_rule(mean.tolist(), 4, s.tolist(), 0.5))
    np.testing.assert_array_equal(pl.anti_correlation(batch, 4, weight=0.0), pl.greedy(mean, 4))


def test_anti_correlation_separates_correlated_hot_experts():
    x = np.tile([1.0, -1.0], 4)  # experts 1, 2: the same series (perfectly correlated)
    y = np.repeat([1.0, -1.0, 1.0, -1.0], 2)  # expert 0: uncorrelated with them
    batch = np.stack([0.5 + 0.05 * y, 0.2 + 0.05 * x, 0.2 + 0.05 * x,
                      np.full(8, 0.03), np.full(8, 0.03), np.full(8, 0.03)], axis=1)  # 3..5: zero variance
    greedy = pl.greedy(batch.mean(0), 2)
    assert greedy[1] == greedy[2]  # greedy puts the pair together (0.2 + 0.2 < 0.5) ...
    anti = pl.anti_correlation(batch, 2)
    assert anti[1] != anti[2]  # ... anti-correlation splits it
    s = pl.correlation(batch)
    assert np.isclose(s[1, 2], 1.0) and np.isclose(s[0, 1], 0.0)
    assert np.all(s[3:] == 0) and np.all(s[:, 3:] == 0)  # zero variance: no correlation, no NaN


# ---------------------------------------------------------------------------------------------------------
# replicas


def test_replicate_hand_worked_example():
    # copies: 0 has load/replica 6 -> 2 copies (3 each) -> 3 copies (2 each), counts [3, 1, 1, 1];
    # packing (2,2,2 of expert 0, then 1: 2, 2: 1, 3: 1): 0->d0, 0->d1 (no copy there), 0->d0 (both hold one;
    # lighter: tie, lower id), 1->d1 (4, 4), 2->d0 (tie, lower id; d0 now full), 3->d1
    p = pl.replicate([6, 2, 1, 1], 2, 6)
    np.testing.assert_array_equal(p.replica_count, [3, 1, 1, 1])
    assert p.logical_of_slot == (0, 0, 2, 0, 1, 3)
    np.testing.assert_allclose(p.slot_loads(np.asarray([[6.0, 2, 1, 1]])), [[2, 2, 1, 2, 2, 1]])
    np.testing.assert_allclose(pl.device_shares([[6, 2, 1, 1]], p), [[0.5, 0.5]])
    assert p.local_experts(0) == [0, 2] and p.local_experts(1) == [0, 1, 3]
    np.testing.assert_array_equal(p.replica_slots, [[0, 1, 3], [4, 4, 4], [2, 2, 2], [5, 5, 5]])


@pytest.mark.parametrize("seed", range(3))
def test_replica_counts_give_the_next_copy_to_the_largest_load_per_replica(seed):
    loads = np.random.default_rng(seed).zipf(1.7, size=10).astype(float)
    count = np.ones(10)
    for _ in range(6):  # the definition, one copy at a time
        count[np.argmax(loads / count)] += 1
    np.testing.assert_array_equal(pl.replica_counts(loads, 16), count)
    p = pl.replicate(loads, 4, 16)
    np.testing.assert_array_equal(p.replica_count, count)
    assert p.num_slots == 16 and p.slots_per_device == 4
    # every device's load, from the per-replica loads, matches the metric
    per_device = [sum(loads[e] / count[e] for e in p.logical_of_slot[4 * d:4 * d + 4]) for d in range(4)]
    np.testing.assert_allclose(pl.device_shares(loads[None], p)[0], np.asarray(per_device) / loads.sum())


# ---------------------------------------------------------------------------------------------------------
# metrics


def test_max_load_and_avg_max_load_against_numpy():
    rng = np.random.default_rng(0)
    batch = rng.integers(0, 50, size=(7, 8)).astype(float)
    device_of_expert = np.asarray([2, 0, 1, 3, 0, 2, 3, 1])
    shares = np.zeros((7, 4))
    for b in range(7):
        for e in range(8):
            shares[b, device_of_expert[e]] += batch[b, e] / batch[b].sum()
    assert np.isclose(pl.max_load(batch, device_of_expert, 4), shares.max())
    assert np.isclose(pl.avg_max_load(batch, device_of_expert, 4), np.mean([shares[b].max() for b in range(7)]))
    # scale does not matter: counts and fractions give the same shares
    assert np.isclose(pl.avg_max_load(batch / 100, device_of_expert, 4), shares.max(1).mean())


# ---------------------------------------------------------------------------------------------------------
# search


def _balanced_placements(num_experts, num_devices):
    per = num_experts // num_devices
    for p in itertools.product(range(num_devices), repeat=num_experts):
        if p[0] == 0 and all(p.count(d) == per for d in range(num_devices)):  # device names are symmetric
            yield np.asarray(p)


@pytest.mark.parametrize("num_experts,num_devices,seed", [(6, 2, 0), (6, 2, 1), (6, 3, 2), (8, 2, 3), (8, 4, 4),
                                                          (8, 4, 5)])
def test_search_finds_the_brute_force_optimum_and_never_loses_to_greedy(num_experts, num_devices, seed):
    rng = np.random.default_rng(seed)
    batch = rng.dirichlet(np.full(num_experts, 0.4), size=12)
    best = min(pl.avg_max_load(batch, p, num_devices) for p in _balanced_placements(num_experts, num_devices))
    greedy = pl.avg_max_load(batch, pl.greedy(batch.mean(0), num_devices), num_devices)
    found = pl.search(batch, num_devices)
    assert not found.is_replicated
    pl.check(found.device_of_expert, num_devices)
    assert pl.avg_max_load(batch, found) <= greedy + 1e-12
    assert np.isclose(pl.avg_max_load(batch, found), best, rtol=1e-6)


@pytest.mark.parametrize("seed", range(3))
def test_search_never_worse_than_its_start(seed):
    rng = np.random.default_rng(seed)
    batch = rng.zipf(1.6, size=(16, 16)).clip(max=40).astype(float)
    for start in (pl.contiguous(16, 4), pl.anti_correlation(batch, 4), pl.replicate(batch.mean(0), 4, 20)):
        start = pl.as_placement(start, 4)
        found = pl.search(batch, start=start, restarts=4)
        assert pl.avg_max_load(batch, found) <= pl.avg_max_load(batch, start)
        assert sorted(found.logical_of_slot) == sorted(start.logical_of_slot)  # same replicas, moved only
    # already optimal (perfectly balanced every batch): returns its start unchanged
    flat = np.ones((4, 8))
    start = pl.as_placement(pl.contiguous(8, 2), 2)
    assert pl.search(flat, start=start) == start


# ---------------------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize("call,message", [
    (lambda: pl.check([0, 1, 1], 2), r"num_devices=2 must divide the number of experts \(3\)"),
    (lambda: pl.check([0, 1, 2, 1], 2), r"placement \[0, 1, 2, 1\] names devices outside \[0, 2\)"),
    (lambda: pl.check([0, 0, 0, 1], 2), r"puts \[3, 1\] experts on the devices; each must hold 2"),
    (lambda: pl.check([-1, 0, 1, 1], 2), r"names devices outside"),
    (lambda: pl.greedy([1, 2, 3], 2), "num_devices=2 must divide num_experts=3"),
    (lambda: pl.greedy([1, -2, 3, 4], 2), r"mean_loads must be finite and >= 0; got -2.0 at index \(1,\)"),
    (lambda: pl.greedy([1, np.nan, 3, 4], 2), r"got nan at index \(1,\)"),
    (lambda: pl.greedy([1, 2, 3, 4], 0), "num_devices=0 must be a positive int"),
    (lambda: pl.anti_correlation([[1, 2, 3, 4], [1, 2, -3, 4]], 2), r"got -3.0 at index \(1, 2\)"),
    (lambda: pl.anti_correlation([1, 2, 3, 4], 2), r"batch_loads must be a non-empty array \[num_batches"),
    (lambda: pl.anti_correlation([[1, 2, 3, 4]], 2, weight=-1), "weight=-1 must be finite and >= 0"),
    (lambda: pl.replicate([1, 2, 3, 4], 2, 3), "num_slots=3 must be >= num_experts=4"),
    (lambda: pl.replicate([1, 2, 3, 4], 4, 6), "num_devices=4 must divide num_slots=6"),
    (lambda: pl.max_load([[1, 2, 3]], [0, 0, 1, 1], 2), "loads have 3 experts but the placement has 4"),
    (lambda: pl.Placement((0, 1, 3, 3), 2), "expert 2 has no physical slot"),
    (lambda: pl.Placement((0, 1, 2), 2), r"num_devices=2 must divide the number of physical slots \(3\)"),
    (lambda: pl.Placement((0, 0, 1, 1), 1).device_of_expert, r"replicates experts \(counts \[2, 2\]\)"),
    (lambda: pl.search([[1, 2, 3, 4]], 2, restarts=-1), "restarts=-1 must be an int >= 0"),
])
def test_bad_input_names_the_bad_value(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# ---------------------------------------------------------------------------------------------------------
# placements used for real: load traces, expert parallelism, capacity policies

TOKENS = jnp.asarray(np.random.RandomState(0).randint(0, 64, size=(3, 10)))  # 30 tokens: padded to 32


@pytest.fixture(scope="module")
def model():
    return decisive_model()


@pytest.fixture(scope="module")
def mesh():
    return expert_mesh()


forward = nnx.jit(lambda m, t: m.forward(t))


def test_load_trace_counts_each_layers_routed_pairs(model):
    batches = [TOKENS, TOKENS[:, ::-1], TOKENS[:2]]
    masks = [np.ones(b.shape, bool) for b in batches]
    masks[2][1, 5:] = False
    trace = stats.load_trace(model, batches, masks)
    assert trace.shape == (3, 2, 8)
    for b, (tokens, mask) in enumerate(zip(batches, masks)):
        out = model.forward(tokens, token_mask=jnp.asarray(mask))
        for layer, r in enumerate(out.routings):
            experts = np.asarray(r.experts)[mask.reshape(-1)]
            np.testing.assert_array_equal(trace[b, layer], np.bincount(experts.ravel(), minlength=8))


def test_expert_parallel_with_fitted_placements_equals_single_device(model, mesh):
    trace = stats.load_trace(model, [TOKENS, TOKENS[:, ::-1]])  # [batch, layer, E]
    greedy = [pl.greedy(trace[:, layer].mean(0), 8) for layer in range(2)]
    assert any((g != pl.contiguous(8, 8)).any() for g in greedy)
    ref = model.forward(TOKENS).logits
    out = forward(parallel.expert_parallel(model, mesh, placements=greedy), TOKENS)
    np.testing.assert_allclose(np.asarray(out.logits), np.asarray(ref), atol=1e-5, rtol=0)


@pytest.mark.parametrize("options", [dict(gating="dynamic"), dict(gating="static", capacity_fraction=2.0)])
def test_expert_parallel_with_replicas_equals_single_device(model, mesh, options):
    mean = np.asarray([40.0, 1, 1, 1, 1, 1, 1, 30])
    replicated = pl.replicate(mean, 4, 16)  # 16 slots on 4 devices: the hot experts get several copies
    assert replicated.replica_count[0] >= 3 and replicated.replica_count[7] >= 3
    ref = model.forward(TOKENS).logits
    ep = parallel.expert_parallel(model, parallel.make_mesh(expert=4, data=2), placement=replicated, **options)
    block = ep.moe_blocks()[0]
    assert block.w_gate.shape[0] == 16  # one weight copy per physical slot
    np.testing.assert_array_equal(np.asarray(block.w_gate[...]),
                                  np.asarray(model.moe_blocks()[0].w_gate[...])[list(replicated.logical_of_slot)])
    out = forward(ep, TOKENS)
    np.testing.assert_allclose(np.asarray(out.logits), np.asarray(ref), atol=1e-5, rtol=0)
    assert all(bool(r.keep.all()) for r in out.routings)
    # 8 devices, 2 slots each, an expert replicated on up to 8 devices
    wide = pl.replicate(mean, 8, 16)
    out = forward(parallel.expert_parallel(model, mesh, placement=wide, **options), TOKENS)
    np.testing.assert_allclose(np.asarray(out.logits), np.asarray(ref), atol=1e-5, rtol=0)


def test_replicas_split_an_experts_pairs_evenly(model, mesh):
    """Through the static gating's per-slot capacity: with replicas, an expert's pairs spread over its
    slots (token index mod replicas), so a capacity that drops pairs of one copy keeps them all."""
    tokens = jnp.asarray(np.full((2, 16), 7))  # every token routes alike: two experts get every pair
    routed = np.asarray(model.forward(tokens).routings[0].experts[0])
    mean = np.full(8, 30.0)
    mean[routed] = 100.0
    replicated = pl.replicate(mean, 8, 16)  # copies at 50, 33, 25 per replica: 4 each, then cold ones (30)
    assert (replicated.replica_count[routed] == 4).all()
    one_copy = forward(parallel.expert_parallel(model, mesh, "static", capacity_fraction=0.25), tokens)
    copies = forward(parallel.expert_parallel(model, mesh, "static", capacity_fraction=0.25,
                                              placement=replicated), tokens)
    # 4 tokens per device, 1 slot per (expert, source device): 1 of 4 pairs kept per copy; 4 copies keep all
    assert int(one_copy.routings[0].keep.sum()) == 2 * 8 and bool(copies.routings[0].keep.all())


def test_capacity_policy_takes_its_local_experts_from_the_placement(model, mesh):
    trace = stats.load_trace(model, [TOKENS])
    device_of_expert = pl.greedy(trace[0, 0], 8)
    policy = moejax.MoEPolicy(capacity_factor=1.0, expanded="local", placement=tuple(device_of_expert))
    dropping = moejax.with_policy(model, policy)
    ref = dropping.forward(TOKENS)
    out = forward(parallel.expert_parallel(dropping, mesh, placement=tuple(device_of_expert)), TOKENS)
    np.testing.assert_allclose(np.asarray(out.logits), np.asarray(ref.logits), atol=1e-5, rtol=0)
    # each token's extra candidates are the experts the placement put on its device
    wide = np.asarray(ref.routings[0].experts)[:, 2:]
    token_device = pl.token_devices(30, 8)
    np.testing.assert_array_equal(device_of_expert[wide], np.broadcast_to(token_device[:, None], wide.shape))


def test_bad_parallel_placements(model, mesh):
    with pytest.raises(ValueError, match="placement spans 4 devices but the mesh's expert axis has 8"):
        parallel.expert_parallel(model, mesh, placement=pl.replicate(np.ones(8), 4, 8))
    with pytest.raises(ValueError, match="placement covers 4 experts but the model has 8"):
        parallel.expert_parallel(model, mesh, placement=pl.Placement(tuple(range(4)) * 2, 8))
    with pytest.raises(ValueError, match="3 placements for 2 MoE blocks"):
        parallel.expert_parallel(model, mesh, placements=[pl.contiguous(8, 8)] * 3)
