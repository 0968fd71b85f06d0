"""Expert buffering: the cache policies against brute-force references, and buffered generation against
generation with every expert resident."""

import collections
import functools
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import moejax
from moejax import buffering
from tests.tiny import tiny_config

OTHER_POLICIES = ("lifo", "lru", "fifo", "lfu")


def _random_trace(rng: random.Random, steps: int, num_experts: int, max_active: int):
    return [sorted(rng.sample(range(num_experts), rng.randint(1, max_active))) for _ in range(steps)]


def _fewest_misses(trace, cache_size: int) -> int:
    """Exhaustive search over every eviction choice at every miss (memoised on position and contents)."""
    sequence = [e for step in trace for e in sorted(step)]

    @functools.lru_cache(maxsize=None)
    def best(position: int, resident: frozenset) -> int:
        if position == len(sequence):
            return 0
        e = sequence[position]
        if e in resident:
            return best(position + 1, resident)
        if len(resident) < cache_size:
            return 1 + best(position + 1, resident | {e})
        return 1 + min(best(position + 1, (resident - {victim}) | {e}) for victim in resident)

    return best(0, frozenset())


# -- reference policies, written the obvious way over the flattened request sequence


def _reference_misses(trace, cache_size: int, policy: str) -> int:
    resident = collections.OrderedDict()  # expert -> None, in the order the policy reads
    loaded_at, last_used, uses = {}, {}, {}
    misses, tick = 0, 0
    for step in trace:
        for e in sorted(step):
            tick += 1
            if e not in resident:
                misses += 1
                if len(resident) == cache_size:
                    if policy == "fifo":
                        victim = min(resident, key=loaded_at.get)
                    elif policy == "lru":
                        victim = min(resident, key=last_used.get)
                    elif policy == "lfu":
                        victim = min(resident, key=lambda x: (uses[x], last_used[x]))
                    else:  # lifo, the paper's: inactive in this step first, then the most recently loaded
                        inactive = [x for x in resident if x not in step]
                        victim = max(inactive or list(resident), key=loaded_at.get)
                    del resident[victim]
                resident[e] = None
                loaded_at[e], uses[e] = tick, 0
            last_used[e] = tick
            uses[e] += 1
    return misses


def test_belady_equals_exhaustive_search_and_beats_every_policy_on_tiny_traces():
    rng = random.Random(0)
    for _ in range(60):
        trace = _random_trace(rng, steps=rng.randint(2, 5), num_experts=5, max_active=3)
        for cache_size in (1, 2, 3):
            optimum = _fewest_misses(trace, cache_size)
            assert buffering.simulate(trace, cache_size, "belady").misses == optimum, (trace, cache_size)
            for policy in OTHER_POLICIES:
                assert buffering.simulate(trace, cache_size, policy).misses >= optimum


def test_belady_never_worse_than_any_policy_on_longer_traces():
    rng = random.Random(1)
    for _ in range(10):
        trace = _random_trace(rng, steps=60, num_experts=16, max_active=6)
        for cache_size in (2, 5, 9):
            belady = buffering.simulate(trace, cache_size, "belady").misses
            assert all(belady <= buffering.simulate(trace, cache_size, p).misses for p in OTHER_POLICIES)


def test_policies_match_reference_implementations():
    rng = random.Random(2)
    for _ in range(30):
        trace = _random_trace(rng, steps=25, num_experts=8, max_active=5)
        for cache_size in (1, 3, 6):
            for policy in OTHER_POLICIES:
                got = buffering.simulate(trace, cache_size, policy).misses
                assert got == _reference_misses(trace, cache_size, policy), (policy, cache_size, trace)


def test_lifo_on_a_hand_worked_trace():
    cache = buffering.ExpertCache(3, "lifo")
    A = buffering.Access
    assert cache.run_step([0, 1, 2]) == [A(0, 0, True, None), A(1, 1, True, None), A(2, 2, True, None)]
    # 3 misses; 0 and 2 are inactive in this step: the more recently loaded of them, 2, goes
    assert cache.run_step([1, 3]) == [A(1, 1, False, None), A(3, 2, True, 2)]
    # 2 misses; only 1 is inactive: it goes. 4 misses; all of 0, 2, 3 are active: the latest loaded, 2, goes
    assert cache.run_step([0, 2, 3, 4]) == [A(0, 0, False, None), A(2, 1, True, 1), A(3, 2, False, None),
                                           A(4, 1, True, 2)]
    # 0, 3, 4 all inactive: the latest loaded, 4, goes
    assert cache.run_step([2]) == [A(2, 1, True, 4)]
    assert (cache.stats.hits, cache.stats.misses, cache.stats.requests) == (3, 7, 10)
    assert cache.resident == {0: 0, 3: 2, 2: 1}


def test_every_policy_stays_within_the_cache_and_counts_every_request():
    rng = random.Random(3)
    for _ in range(10):
        trace = _random_trace(rng, steps=40, num_experts=12, max_active=7)
        predictions = [None if rng.random() < 0.3 else sorted(rng.sample(range(12), rng.randint(0, 6)))
                       for _ in trace]
        for cache_size in (1, 4, 12):
            for policy in buffering.POLICIES:
                cache = buffering.ExpertCache(cache_size, policy, future=trace if policy == "belady" else None)
                for step, predicted in zip(trace, predictions):
                    if predicted:
                        cache.prefetch(predicted)
                        assert len(cache.slot_of) <= cache_size
                    cache.begin_step(step)
                    for e in step:
                        access = cache.request(e)
                        assert cache.slot_of[e] == access.slot  # the requested expert is resident
                        assert len(cache.slot_of) <= cache_size
                        assert sorted(cache.slot_of.values()) == sorted(set(cache.slot_of.values()))
                    cache.end_step()
                stats = cache.stats
                assert stats.hits + stats.misses == stats.requests == sum(len(s) for s in trace)
                assert stats.max_resident <= cache_size
                simulated = buffering.simulate(trace, cache_size, policy, prefetch=predictions)
                assert (simulated.hits, simulated.misses, simulated.prefetch_loads) == (
                    stats.hits, stats.misses, stats.prefetch_loads)


def test_perfect_prefetch_leaves_no_demand_misses_and_counts_bytes():
    trace = [[0, 3], [1, 3], [0, 2], [2, 3]]
    stats = buffering.simulate(trace, 4, "lru", prefetch=trace, expert_bytes=100)
    assert stats.misses == 0 and stats.hits == 8
    assert stats.prefetch_loads == 4 and stats.bytes_moved == 400  # each expert copied once
    assert stats.prediction_recall == stats.prediction_precision == 1.0
    cold = buffering.simulate(trace, 4, "lru", expert_bytes=100)
    assert (cold.misses, cold.bytes_moved, cold.prefetch_loads) == (4, 400, 0)
    # right: 1 of {1, 2} for [1, 3], none of {3} for [0, 2], 2 of {2} for [2, 3]
    partly = buffering.simulate(trace, 2, "lru", prefetch=[None, [1, 2], [3], [2]])
    assert (partly.predicted, partly.predicted_right, partly.active_predicted_steps) == (4, 2, 6)
    assert partly.prediction_recall == pytest.approx(2 / 6) and partly.prediction_precision == pytest.approx(2 / 4)


def test_bad_input_names_the_bad_value():
    with pytest.raises(ValueError, match="cache_size=0"):
        buffering.simulate([[0]], 0, "lru")
    with pytest.raises(ValueError, match="cache_size=-2"):
        buffering.ExpertCache(-2, "lru")
    with pytest.raises(ValueError, match="cache_size=1.5"):
        buffering.simulate([[0]], 1.5, "lru")
    with pytest.raises(ValueError, match="'mru'"):
        buffering.simulate([[0]], 2, "mru")
    with pytest.raises(ValueError, match="belady.*future"):
        buffering.ExpertCache(2, "belady")
    with pytest.raises(ValueError, match="expert id -1"):
        buffering.simulate([[0, -1]], 2, "lru")
    cache = buffering.ExpertCache(2, "belady", future=[[0, 1], [1]])
    cache.run_step([0, 1])
    with pytest.raises(ValueError, match=r"step 1 requests experts \[2\].*future trace says \[1\]"):
        cache.begin_step([2])


# -- buffered generation on a tiny model


@pytest.fixture(scope="module")
def model():
    # decisive routing and greedy choices (far from ties), as in test_generate
    m = moejax.random_model(tiny_config(num_experts=8, num_experts_per_tok=2), seed=3)
    for block in m.moe_blocks():
        block.router[...] = block.router[...] * 20
    m.lm_head[...] = m.lm_head[...] * 20
    return m


PROMPTS = [[5, 9, 2], [7, 1, 4, 4, 8, 3, 9, 10, 11, 2, 6]]
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def resident_tokens(model):
    return np.asarray(moejax.generate(model, PROMPTS, max_new_tokens=NEW_TOKENS))


def _check_slots_hold_their_experts(model, run, cache_size):
    """Each layer's slots hold exactly the experts its maps say, as the host store has them; never more
    than cache_size of them."""
    for block in model.moe_blocks():
        cache = run.caches[block.layer]
        expert_of = np.asarray(cache.expert_of)
        assert len(expert_of) == min(cache_size, model.config.num_experts)  # the device holds no more
        assert np.array_equal(np.asarray(cache.slot_of)[expert_of[expert_of >= 0]], np.flatnonzero(expert_of >= 0))
        for slot, expert in enumerate(expert_of):
            if expert >= 0:
                for device_slots, host in zip(jax.tree.leaves(cache.slots), jax.tree.leaves(block.expert_weights())):
                    np.testing.assert_array_equal(np.asarray(device_slots[slot]), np.asarray(host[expert]))


def _check_simulator_agrees(run, cache_size, policy, prefetch=False):
    for layer, trace in run.trace.items():
        simulated = buffering.simulate(trace, cache_size, policy, prefetch=run.predictions[layer] if prefetch else None)
        got = run.stats[layer]
        fields = ("requests", "hits", "misses", "evictions", "prefetch_loads", "prefetch_hits", "predicted",
                  "predicted_right", "max_resident", "steps")
        assert [getattr(got, f) for f in fields] == [getattr(simulated, f) for f in fields], (policy, cache_size)


def test_buffered_generation_equals_resident_for_every_policy_with_one_slot(model, resident_tokens):
    """One slot per layer: every step (4 active experts per decode step, all 8 in prefill) streams."""
    runs = {}
    for policy in buffering.POLICIES:
        future = runs["lifo"].trace if policy == "belady" else None  # the trace does not depend on the cache
        run = buffering.generate(model, PROMPTS, NEW_TOKENS, cache_size=1, policy=policy, future=future)
        np.testing.assert_array_equal(run.tokens, resident_tokens, err_msg=policy)
        assert max(len(step) for step in run.trace[0]) > 1  # the active set exceeds the cache
        _check_simulator_agrees(run, 1, policy)
        for layer, trace in run.trace.items():
            decode = run.stats[layer] - run.prefill_stats[layer]
            simulated = buffering.simulate(trace, 1, policy, warmup_steps=1)
            assert (decode.hits, decode.misses) == (simulated.hits, simulated.misses) != (0, 0)
        _check_slots_hold_their_experts(model, run, 1)
        runs[policy] = run


@pytest.mark.slow
def test_buffered_generation_equals_resident_for_every_policy_and_cache_size(model, resident_tokens):
    trace = buffering.record_trace(model, PROMPTS, NEW_TOKENS)
    for cache_size in (2, 5, 8):  # 1 and 3 slots: the tests above and below
        for policy in buffering.POLICIES:
            run = buffering.generate(model, PROMPTS, NEW_TOKENS, cache_size=cache_size, policy=policy,
                                     future=trace if policy == "belady" else None)
            np.testing.assert_array_equal(run.tokens, resident_tokens, err_msg=f"{policy} {cache_size}")
            _check_simulator_agrees(run, cache_size, policy)
    assert run.stats[0].misses == model.config.num_experts  # all resident: every expert loaded once


@pytest.mark.slow
def test_buffered_generation_with_prefetch_matches_resident_and_the_simulator(model, resident_tokens):
    # 1 and 2 slots: prefetched copies evicted by the same step's demand loads, streaming with prefetch
    for cache_size, policy in ((1, "lru"), (2, "lifo"), (3, "lfu"), (5, "fifo")):
        run = buffering.generate(model, PROMPTS, NEW_TOKENS, cache_size=cache_size, policy=policy, prefetch=True)
        np.testing.assert_array_equal(run.tokens, resident_tokens, err_msg=f"{policy} {cache_size}")
        assert run.predictions[0] == [None] * len(run.trace[0])  # the first MoE layer has no predecessor
        assert all(p is not None for p in run.predictions[1])
        _check_simulator_agrees(run, cache_size, policy, prefetch=True)
        assert run.stats[1].predicted > 0 and run.stats[1].prefetch_loads > 0
        _check_slots_hold_their_experts(model, run, cache_size)


def test_buffered_sampling_draws_what_generate_draws(model):
    """Temperature and nucleus sampling with the same key: the same tokens as moejax.generate."""
    key = jax.random.key(7)
    want = np.asarray(moejax.generate(model, PROMPTS, max_new_tokens=NEW_TOKENS, key=key, temperature=1.5, top_p=0.9))
    greedy = np.asarray(moejax.generate(model, PROMPTS, max_new_tokens=NEW_TOKENS))
    assert not np.array_equal(want, greedy)  # the draw matters
    run = buffering.generate(model, PROMPTS, NEW_TOKENS, cache_size=3, key=key, temperature=1.5, top_p=0.9)
    np.testing.assert_array_equal(run.tokens, want)


def test_a_buffered_model_is_a_model_that_moejax_generate_runs(model, resident_tokens):
    """buffered() returns a CausalLM: moejax.generate and model.forward run it as they run any model."""
    small = buffering.buffered(model, 3, "lifo", prefetch=True)
    assert isinstance(small, moejax.CausalLM)
    assert all(isinstance(b.runtime.experts, buffering.Buffered) for b in small.moe_blocks())
    assert all(isinstance(b.runtime.experts, moejax.experts.Resident) for b in model.moe_blocks())  # untouched
    np.testing.assert_array_equal(np.asarray(moejax.generate(small, PROMPTS, NEW_TOKENS)), resident_tokens)
    tokens = jnp.asarray([[5, 9, 2, 7, 1, 4]])
    np.testing.assert_allclose(np.asarray(small.forward(tokens).logits), np.asarray(model.forward(tokens).logits),
                               atol=1e-5)
    assert buffering.device_bytes(small) == 3 * buffering.expert_bytes(model) * len(small.moe_blocks())


@pytest.mark.parametrize("prefetch", [False, True])
def test_buffered_generation_with_dense_layers_and_a_shared_expert(prefetch):
    """Dense layers before, between and after MoE layers and a gated shared expert beside the routed ones
    (Qwen2-MoE); the prediction skips the dense layer between."""
    config = tiny_config(architecture="qwen2_moe", num_layers=5, moe_layers=(False, True, False, True, False),
                         num_experts=8, shared_expert_intermediate_size=16, shared_expert_gate=True)
    m = moejax.random_model(config, seed=5)
    for block in m.moe_blocks():
        block.router[...] = block.router[...] * 20
    m.lm_head[...] = m.lm_head[...] * 20
    resident = np.asarray(moejax.generate(m, PROMPTS, max_new_tokens=NEW_TOKENS))
    run = buffering.generate(m, PROMPTS, NEW_TOKENS, cache_size=3, policy="lifo", prefetch=prefetch)
    np.testing.assert_array_equal(run.tokens, resident)
    assert sorted(run.trace) == [1, 3]
    _check_simulator_agrees(run, 3, "lifo", prefetch)
    assert (run.stats[3].predicted > 0) == prefetch
    _check_slots_hold_their_experts(m, run, 3)


@pytest.mark.slow
def test_buffered_generation_in_bfloat16():
    """bf16 weights: the store and the slots keep the dtype; tokens equal moejax.generate's."""
    m = moejax.random_model(tiny_config(num_experts=8, num_experts_per_tok=2), seed=3, dtype=jnp.bfloat16)
    for block in m.moe_blocks():
        block.router[...] = block.router[...] * 20
    m.lm_head[...] = m.lm_head[...] * 20
    want = np.asarray(moejax.generate(m, PROMPTS, max_new_tokens=NEW_TOKENS))
    run = buffering.generate(m, PROMPTS, NEW_TOKENS, cache_size=3, policy="lifo", prefetch=True)
    assert all(s.dtype == jnp.bfloat16 for c in run.caches.values() for s in jax.tree.leaves(c.slots))
    np.testing.assert_array_equal(run.tokens, want)
    _check_slots_hold_their_experts(m, run, 3)


def test_int8_copies_on_a_miss(model):
    """low_precision="int8": demand misses copy an int8 expert (a quarter of the f32 bytes) and compute with
    it; prefetched experts come in full precision; on decisive routing the cache decides exactly as at full
    precision."""
    q, scales = buffering.slots.quantize_int8(model.moe_blocks()[0].w_up[...])
    assert q.dtype == jnp.int8 and q.nbytes * 4 == model.moe_blocks()[0].w_up[...].nbytes
    np.testing.assert_allclose(np.asarray(q * scales), np.asarray(model.moe_blocks()[0].w_up[...]),
                               atol=float(scales.max()) / 2 + 1e-7)
    exact = buffering.generate(model, PROMPTS, NEW_TOKENS, cache_size=3, prefetch=True)
    run = buffering.generate(model, PROMPTS, NEW_TOKENS, cache_size=3, prefetch=True, low_precision="int8")
    assert run.trace == exact.trace and run.stats == exact.stats
    assert run.stats[1].prefetch_loads > 0
    # layer 0 has no prediction: every slot a demand (int8) copy; an unused prefetch in layer 1: full precision
    block = model.moe_blocks()[0]
    dequantized = [np.asarray(q * s)
                   for q, s in map(buffering.slots.quantize_int8, jax.tree.leaves(block.expert_weights()))]
    for slot, expert in enumerate(np.asarray(run.caches[0].expert_of)):
        for got, want in zip(jax.tree.leaves(run.caches[0].slots), dequantized):
            np.testing.assert_allclose(np.asarray(got[slot]), want[expert], rtol=1e-6, atol=1e-7)
    cache = run.caches[1]
    for slot in np.flatnonzero(np.asarray(cache.unused_prefetch)):
        for got, want in zip(jax.tree.leaves(cache.slots), jax.tree.leaves(model.moe_blocks()[1].expert_weights())):
            np.testing.assert_array_equal(np.asarray(got[slot]), np.asarray(want[int(cache.expert_of[slot])]))


@pytest.mark.slow
def test_int8_copies_stay_close_to_full_precision_on_the_default_model():
    """The stated tolerance: with every expert an int8 demand copy (a prefill from an empty cache), logits
    within 5% of the logit scale and the mean next-token loss within 1%."""
    model = moejax.load_pretrained("experiments/default_model")
    tokenizer = moejax.load_tokenizer("experiments/default_model")
    ids = tokenizer.encode(open(moejax.generate.__code__.co_filename).read()[:2000]).ids[:256]
    tokens = jnp.asarray([ids])
    full = model.forward(tokens).logits
    low = buffering.buffered(model, 16, "lifo", low_precision="int8").forward(tokens).logits
    error, scale = float(jnp.abs(low - full).max()), float(jnp.abs(full).max())
    assert 0 < error < 0.05 * scale

    def loss(logits):
        logprobs = jax.nn.log_softmax(logits[0, :-1], axis=-1)
        return -float(jnp.take_along_axis(logprobs, tokens[0, 1:, None], axis=-1).mean())

    assert abs(loss(low) - loss(full)) < 0.01 * loss(full)


def test_buffered_generation_bad_input(model):
    with pytest.raises(ValueError, match="belady.*future"):
        buffering.generate(model, PROMPTS, 2, cache_size=2, policy="belady")
    with pytest.raises(ValueError, match="cache_size=0"):
        buffering.generate(model, PROMPTS, 2, cache_size=0)
    with pytest.raises(ValueError, match="'random'"):
        buffering.buffered(model, 2, "random")
    with pytest.raises(ValueError, match="cache_size"):
        buffering.generate(model, PROMPTS, 2)
    with pytest.raises(ValueError, match="low_precision='fp4'"):
        buffering.buffered(model, 2, low_precision="fp4")
    with pytest.raises(ValueError, match="future has layers"):
        buffering.buffered(model, 2, "belady", future={5: [(0,)]})
    dense = moejax.random_model(tiny_config(moe_layers=(False, False)), seed=0)
    with pytest.raises(ValueError, match="no MoE layer"):
        buffering.buffered(dense, 2)
    ep = moejax.parallel.expert_parallel(model, moejax.parallel.make_mesh())
    with pytest.raises(ValueError, match="resident on one device"):
        buffering.buffered(ep, 2)


def test_host_storage_is_device_memory_on_the_cpu_backend(model):
    assert jax.default_backend() == "cpu"
    assert buffering.host_memory_kind() is None
    small = buffering.buffered(model, 2)
    assert all(b.runtime.experts.host_memory is None for b in small.moe_blocks())
    c = model.config
    assert buffering.expert_bytes(model) == 3 * c.hidden_size * c.moe_intermediate_size * 4  # three f32 matrices


@pytest.mark.parametrize("kwargs, match", [
    (dict(temperature=-1.0, key=jax.random.key(0)), "temperature=-1.0 must be >= 0"),
    (dict(top_p=5.0), "top_p=5.0 must be in"),
    (dict(stop_tokens=[10_000]), "stop token 10000 is outside the vocabulary"),
    (dict(temperature=0.5), "needs an explicit PRNG key"),
])
def test_buffered_generation_checks_its_arguments_as_generate_does(model, kwargs, match):
    for run in (lambda: moejax.generate(model, [[1, 2, 3]], 2, **kwargs),
                lambda: buffering.generate(model, [[1, 2, 3]], 2, cache_size=2, **kwargs)):
        with pytest.raises(ValueError, match=match):
            run()
