"""Properties of the pure functions, over inputs hypothesis draws: token drop never exceeds capacity and keeps
the top-C per expert, placements are valid assignments, no eviction policy misses less than Belady, and the
token-id check accepts exactly the ids in the vocabulary, whatever their integer dtype."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from moejax import buffering, capacity
from moejax import placement as pl
from moejax.generate import pad_prompts
from moejax.models.transformer import check_token_ids

# No example database in the working tree; JAX compiles per shape, so no per-example deadline, and the
# array functions see a few shapes (a new one costs a compilation) with many contents.
QUICK = settings(max_examples=60, deadline=None, database=None)
ARRAYS = settings(max_examples=40, deadline=None, database=None)
SLOW = settings(max_examples=15, deadline=None, database=None)


@st.composite
def routings(draw):
    """(scores float32 [T, E] with ties, experts int32 [T, k] distinct per token, capacity, keep bool [T, k])."""
    num_experts = draw(st.sampled_from([1, 4, 6]))
    top_k = draw(st.sampled_from(sorted({1, min(2, num_experts), num_experts})))
    num_tokens = draw(st.sampled_from([1, 5, 12]))
    # few distinct score values, so that ties (broken towards the lower token) are common
    scores = np.asarray(draw(hnp.arrays(np.int8, (num_tokens, num_experts), elements=st.integers(0, 3))), np.float32)
    experts = np.stack([draw(st.permutations(range(num_experts)))[:top_k] for _ in range(num_tokens)])
    keep = draw(hnp.arrays(np.bool_, (num_tokens, top_k)))
    cap = draw(st.integers(1, num_tokens + 1))
    return scores, experts.astype(np.int32), cap, keep


def _pairs_of(experts, e, mask):
    return [(t, j) for t in range(experts.shape[0]) for j in range(experts.shape[1]) if experts[t, j] == e and mask[t, j]]


@ARRAYS
@given(routings(), st.sampled_from(capacity.DROP_STRATEGIES))
def test_token_drop_never_exceeds_capacity_and_drops_only_from_full_experts(routing, strategy):
    scores, experts, cap, keep = routing
    kept = np.asarray(capacity.token_drop(jnp.asarray(scores), jnp.asarray(experts), cap, strategy,
                                          key=jax.random.key(0), keep=jnp.asarray(keep)))
    assert not (kept & ~keep).any()  # a pair already dropped (padding) is never kept
    for e in range(scores.shape[1]):
        offered = len(_pairs_of(experts, e, keep))
        assert len(_pairs_of(experts, e, kept)) == min(cap, offered)


@ARRAYS
@given(routings())
def test_score_drop_keeps_each_experts_top_capacity_pairs_ties_to_the_lower_token(routing):
    scores, experts, cap, keep = routing
    kept = np.asarray(capacity.token_drop(jnp.asarray(scores), jnp.asarray(experts), cap, "score",
                                          keep=jnp.asarray(keep)))
    expected = np.zeros_like(keep)
    for e in range(scores.shape[1]):
        ranked = sorted(_pairs_of(experts, e, keep), key=lambda pair: (-scores[pair[0], e], pair[0]))
        for t, j in ranked[:cap]:
            expected[t, j] = True
    np.testing.assert_array_equal(kept, expected)


@ARRAYS
@given(routings(), st.data())
def test_device_capacity_is_never_exceeded(routing, data):
    scores, experts, cap, keep = routing
    num_experts = scores.shape[1]
    divisors = [d for d in range(1, num_experts + 1) if num_experts % d == 0]
    devices = data.draw(st.sampled_from(divisors))
    device_of_expert = data.draw(st.permutations(np.repeat(np.arange(devices), num_experts // devices).tolist()))
    device_of_expert = np.asarray(device_of_expert)
    kept = np.asarray(capacity.token_drop(jnp.asarray(scores), jnp.asarray(experts), cap, "score",
                                          keep=jnp.asarray(keep), device_of_expert=device_of_expert))
    on_device = device_of_expert[experts]
    for d in range(devices):
        assert (kept & (on_device == d)).sum() == min(cap, (keep & (on_device == d)).sum())


@ARRAYS
@given(routings(), st.data())
def test_expanded_drop_keeps_each_experts_top_capacity_candidates(routing, data):
    scores, experts, cap, _ = routing
    local = data.draw(hnp.arrays(np.bool_, scores.shape))
    kept = np.asarray(capacity.expanded_drop(jnp.asarray(scores), jnp.asarray(experts), cap, jnp.asarray(local)))
    candidate = local.copy()
    candidate[np.arange(len(experts))[:, None], experts] = True
    assert not (kept & ~candidate).any()
    for e in range(scores.shape[1]):
        ranked = sorted(np.flatnonzero(candidate[:, e]), key=lambda t: (-scores[t, e], t))
        assert np.flatnonzero(kept[:, e]).tolist() == sorted(ranked[:cap])


@QUICK
@given(st.integers(0, 10_000), st.integers(1, 8), st.integers(1, 64), st.floats(0.01, 8.0))
def test_expert_capacity_is_the_ceiling_and_at_least_one(num_tokens, top_k, num_experts, factor):
    # num_experts: the capacity groups (devices under scope="device" may be fewer than top_k)
    c = capacity.expert_capacity(num_tokens, top_k, num_experts, factor)
    exact = factor * top_k * num_tokens / num_experts
    assert isinstance(c, int) and c >= 1
    assert exact - 1e-6 * max(1.0, exact) <= c < max(exact, 1.0) + 1 + 1e-6 * max(1.0, exact)


# ---------------------------------------------------------------------------------------------------------
# Placements are valid assignments


@st.composite
def batch_loads(draw, max_batches=5):
    devices = draw(st.sampled_from([1, 2, 4]))
    num_experts = devices * draw(st.integers(1, 4))
    batches = draw(st.integers(1, max_batches))
    loads = draw(hnp.arrays(np.float64, (batches, num_experts),
                            elements=st.floats(0, 100, allow_nan=False, allow_infinity=False)))
    return loads, devices


def _valid_device_of_expert(placement, num_experts, num_devices):
    assert placement.shape == (num_experts,) and np.issubdtype(placement.dtype, np.integer)
    assert np.array_equal(np.bincount(placement, minlength=num_devices), np.full(num_devices, num_experts // num_devices))
    np.testing.assert_array_equal(pl.check(placement, num_devices), placement)


@QUICK
@given(batch_loads(), st.floats(0, 2))
def test_greedy_contiguous_and_anti_correlation_are_valid_assignments(loads_and_devices, weight):
    loads, devices = loads_and_devices
    num_experts = loads.shape[1]
    _valid_device_of_expert(pl.contiguous(num_experts, devices), num_experts, devices)
    _valid_device_of_expert(pl.greedy(loads.mean(0), devices), num_experts, devices)
    _valid_device_of_expert(pl.anti_correlation(loads, devices, weight), num_experts, devices)


@QUICK
@given(batch_loads(), st.integers(0, 2), st.data())
def test_replicate_gives_every_expert_a_slot_and_every_device_its_share(loads_and_devices, extra_per_device, data):
    loads, devices = loads_and_devices
    num_experts = loads.shape[1]
    num_slots = num_experts + devices * extra_per_device
    p = pl.replicate(loads.mean(0), devices, num_slots)
    assert p.num_slots == num_slots and p.num_devices == devices and p.num_experts == num_experts
    assert (p.replica_count >= 1).all() and p.replica_count.sum() == num_slots
    assert all(len(p.logical_of_slot[d * p.slots_per_device:(d + 1) * p.slots_per_device]) == num_slots // devices
               for d in range(devices))


@SLOW
@given(batch_loads(max_batches=4))
def test_search_returns_a_valid_placement_no_worse_than_its_start(loads_and_devices):
    loads, devices = loads_and_devices
    start = pl.as_placement(pl.greedy(loads.mean(0), devices), devices)
    found = pl.search(loads, devices, max_steps=20, restarts=2)
    assert sorted(found.logical_of_slot) == sorted(start.logical_of_slot)  # the same slots, moved between devices
    _valid_device_of_expert(found.device_of_expert, loads.shape[1], devices)
    assert pl.avg_max_load(loads, found) <= pl.avg_max_load(loads, start)


# ---------------------------------------------------------------------------------------------------------
# The cache simulator against Belady


traces = st.lists(st.lists(st.integers(0, 7), max_size=4), min_size=1, max_size=25)


@QUICK
@given(traces, st.integers(1, 8))
def test_no_policy_misses_less_than_belady(trace, cache_size):
    optimum = buffering.simulate(trace, cache_size, "belady")
    distinct = len({e for step in trace for e in step})
    assert optimum.misses >= distinct  # every expert's first request is a miss
    for policy in buffering.POLICIES:
        stats = buffering.simulate(trace, cache_size, policy)
        assert stats.hits + stats.misses == stats.requests == sum(len(set(s)) for s in trace)
        assert stats.misses >= optimum.misses, policy
        assert stats.max_resident <= cache_size
        if cache_size >= distinct:
            assert stats.misses == distinct  # nothing is ever evicted


@QUICK
@given(traces)
def test_lru_and_belady_never_miss_more_with_a_larger_cache(trace):
    for policy in ("lru", "belady"):  # stack algorithms (FIFO is not: Belady's anomaly)
        misses = [buffering.simulate(trace, size, policy).misses for size in range(1, 9)]
        assert misses == sorted(misses, reverse=True), (policy, misses)


# ---------------------------------------------------------------------------------------------------------
# The one token-id check


integer_dtypes = st.sampled_from([np.int8, np.uint8, np.int16, np.uint16, np.int32, np.uint32, np.int64, np.uint64])


@QUICK
@given(st.data(), integer_dtypes, st.integers(1, 70_000))
def test_token_ids_pass_exactly_when_in_the_vocabulary_whatever_the_dtype(data, dtype, vocab):
    info = np.iinfo(dtype)
    shape = data.draw(hnp.array_shapes(min_dims=2, max_dims=2, max_side=5))
    ids = data.draw(hnp.arrays(dtype, shape, elements=st.integers(int(info.min), int(info.max))))
    bad = [(index, int(v)) for index, v in np.ndenumerate(ids) if not 0 <= int(v) < vocab]
    if not bad:
        out = check_token_ids(ids, vocab)
        assert out.dtype == np.int32 and np.array_equal(out.astype(np.int64), ids.astype(np.int64))
        return
    (index, value), = bad[:1]
    with pytest.raises(ValueError, match=rf"token id {value} at position \({index[0]}, {index[1]}\) is outside"):
        check_token_ids(ids, vocab)


@QUICK
@given(st.lists(st.lists(st.integers(0, 2**31 - 1), min_size=1, max_size=12), min_size=1, max_size=4),
       st.integers(1, 8))
def test_pad_prompts_left_pads_each_prompt_to_a_multiple_of_the_bucket(prompts, bucket):
    tokens, mask = pad_prompts(prompts, bucket=bucket)
    assert tokens.dtype == np.int32 and tokens.shape[1] % bucket == 0
    assert tokens.shape[1] == math.ceil(max(map(len, prompts)) / bucket) * bucket
    for row, m, p in zip(tokens, mask, prompts):
        assert row[m].tolist() == p and m[-len(p):].all() and not m[:-len(p)].any()
