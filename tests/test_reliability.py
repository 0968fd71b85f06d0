"""Nothing silently wrong: argument checks of the pure functions (placement, the cache simulator, data) and
expert parallelism, each error naming the bad value; static gating's drops reported where it is switched on."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import moejax
from moejax import buffering, data, parallel, stats
from moejax import placement as pl
from tests.tiny import tiny_config


@pytest.mark.parametrize("call, match", [
    (lambda: pl.check([0.0, 0.0, 1.0, 1.0], 2), r"device_of_expert\) must be a non-empty int array .*no floats"),
    (lambda: pl.check([0.5, 0.0, 1.0, 1.0], 2), r"must be a non-empty int array .*got \[0\.5, 0\.0, 1\.0, 1\.0\]"),
    (lambda: pl.check([True, False], 2), r"no bools"),
    (lambda: pl.check([0, 0, 1, 1], 2.0), r"num_devices=2\.0 must divide"),
    (lambda: pl.Placement((0.0, 1.0), 1), r"Placement: logical_of_slot must be a non-empty int array"),
    (lambda: pl.Placement((0, 1), True), r"num_devices=True must divide"),
    (lambda: pl.Placement.from_device_of_slot([0, 1], [0.0, 1.0], 2), r"device_of_slot must be a non-empty int"),
    (lambda: pl.Placement.from_device_of_slot([0, 1, 2], [0, 1], 2), r"3 logical experts for 2 slot devices"),
    (lambda: pl.Placement((0, 1, 2, 3), 2).local_experts(2), r"device=2 must be an int in \[0, 2\)"),
    (lambda: pl.contiguous(8.0, 2), r"num_experts=8\.0 must be a positive int"),
    (lambda: pl.contiguous(8, True), r"num_devices=True must be a positive int"),
    (lambda: pl.greedy([1, 2, 3, 4], 2.0), r"num_devices=2\.0 must be a positive int"),
    (lambda: pl.greedy(["a", "b"], 2), r"mean_loads must be an array of numbers; got \['a', 'b'\]"),
    (lambda: pl.replica_counts([1, 2, 3, 4], 6.5), r"num_slots=6\.5 must be an int"),
    (lambda: pl.replicate([1, 2, 3, 4], 2, 6.0), r"num_slots=6\.0 must be an int"),
    (lambda: pl.anti_correlation([[1, 2, 3, 4]], 2, weight="0.5"), r"weight='0\.5' must be finite and >= 0"),
    (lambda: pl.search([[1, 2, 3, 4]], 2, seed=0.5), r"seed=0\.5 must be an int >= 0"),
    (lambda: pl.search([[1, 2, 3, 4]], 2, max_steps=True), r"max_steps=True must be an int >= 0"),
    (lambda: pl.token_devices(10.0, 2), r"num_tokens=10\.0 must be an int >= 0"),
    (lambda: pl.token_devices(10, 0), r"num_devices=0 must be an int >= 1"),
])
def test_placement_arguments_name_the_bad_value(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_a_float_placement_is_refused_where_models_take_one():
    model = moejax.random_model(tiny_config(num_experts=8, num_experts_per_tok=2), seed=0)
    with pytest.raises(ValueError, match=r"must be a non-empty int array"):
        parallel.expert_parallel(model, parallel.make_mesh(), placement=np.asarray([0.0, 1, 2, 3, 4, 5, 6, 7]))


@pytest.mark.parametrize("call, match", [
    (lambda: buffering.simulate([[0, 1.5]], 2), r"requests\[0\]: expert ids must be integers; got \[0, 1\.5\]"),
    (lambda: buffering.simulate([[0], [True]], 2), r"requests\[1\]: expert ids must be integers"),
    (lambda: buffering.simulate(5, 2), r"requests must be a sequence of steps"),
    (lambda: buffering.simulate("012", 2), r"requests must be a sequence of steps"),
    (lambda: buffering.simulate([[0]], 2, expert_bytes=-1), r"expert_bytes=-1 must be an integer >= 0"),
    (lambda: buffering.simulate([[0]], 2, warmup_steps=0.5), r"warmup_steps=0\.5 must be an integer >= 0"),
    (lambda: buffering.simulate([[0]], 2, prefetch=iter([[0]])), r"prefetch must be a sequence"),
    (lambda: buffering.simulate([[0]], True), r"cache_size=True must be an integer >= 1"),
    (lambda: buffering.simulate([[0]], 2, policy=["lru"]), r"unknown eviction policy \['lru'\]"),
    (lambda: buffering.ExpertCache(2, expert_bytes=1.5), r"expert_bytes=1\.5 must be an integer >= 0"),
    (lambda: buffering.ExpertCache(2, "belady", future=[[0.0]]), r"future\[0\]: expert ids must be integers"),
])
def test_simulate_and_expert_cache_arguments_name_the_bad_value(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_expert_cache_refuses_a_float_request():
    cache = buffering.ExpertCache(2)
    cache.begin_step([1])
    with pytest.raises(ValueError, match=r"step 0: expert id 1\.0 must be an integer"):
        cache.request(1.0)


def test_simulate_takes_numpy_and_jax_integer_steps():
    steps = [np.asarray([0, 3]), jnp.asarray([1, 3], jnp.int32), (2,), np.asarray([], np.int64)]
    assert buffering.simulate(steps, 2, "lru").requests == 5


@pytest.mark.parametrize("call, match", [
    (lambda: data.chunks(np.arange(10), 1), r"chunks: length=1 must be an integer >= 2"),
    (lambda: data.chunks(np.arange(10), 4.0), r"chunks: length=4\.0 must be an integer >= 2"),
    (lambda: data.chunks(np.arange(10), 4, max_chunks=-1), r"max_chunks=-1 must be an integer >= 0 or None"),
    (lambda: data.training_batch(np.arange(100), 0, 0, 2.0, 8), r"batch_size=2\.0 must be an integer >= 1"),
    (lambda: data.training_batch(np.arange(100), 0, -1, 2, 8), r"step=-1 must be an integer >= 0"),
    (lambda: data.unigram_log_probs(np.asarray([1, 2, 9]), 8), r"token id 9 at position \(2,\) is outside the "
                                                                r"vocabulary \[0, 8\)"),
    (lambda: data.unigram_log_probs(np.asarray([1.0, 2.0]), 8), r"stream must be integer token ids; got dtype float"),
    (lambda: data.unigram_perplexity(np.zeros(8), [[1, 2], [3, 8]]), r"token id 8 at position \(1, 1\) is outside"),
    (lambda: data.token_stream([np.asarray([1, 2])], 0.5), r"separator=0\.5 must be a token id"),
])
def test_data_arguments_name_the_bad_value(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ---------------------------------------------------------------------------------------------------------
# Expert parallelism


@pytest.mark.parametrize("options, match", [
    (dict(capacity_fraction=float("nan")), r"capacity_fraction=nan must be a finite number > 0"),
    (dict(capacity_fraction="0.25"), r"capacity_fraction='0\.25' must be a finite number > 0"),
    (dict(capacity_fraction=True), r"capacity_fraction=True must be"),
    (dict(bucket=True), r"bucket=True must be an integer >= 1 or None"),
    (dict(bucket=4.0), r"bucket=4\.0 must be an integer >= 1 or None"),
])
def test_expert_parallel_options_name_the_bad_value(options, match):
    with pytest.raises(ValueError, match=match):
        parallel.ExpertParallel(**options)


def test_expert_parallel_needs_a_mesh():
    model = moejax.random_model(tiny_config(num_experts=8, num_experts_per_tok=2), seed=0)
    with pytest.raises(ValueError, match=r"mesh='expert' must be a jax\.sharding\.Mesh"):
        parallel.expert_parallel(model, "expert")


def test_static_gating_says_it_drops_and_the_forward_reports_the_drop_rate():
    model = moejax.random_model(tiny_config(num_experts=8, num_experts_per_tok=2), seed=0)
    for block in model.moe_blocks():
        block.router[...] = block.router[...] * 10  # decisive, uneven routing
    mesh = parallel.make_mesh()
    tokens = jnp.asarray(np.random.RandomState(1).randint(0, 64, size=(4, 16)))
    mask = jnp.ones(tokens.shape, bool)
    forward = nnx.jit(lambda m, t: m.forward(t))
    with pytest.warns(UserWarning, match=r"static gating drops tokens: each expert takes at most ceil\(0\.25 x "
                                         r"local tokens\) pairs"):
        static = parallel.expert_parallel(model, mesh, gating="static")  # the default capacity_fraction
    out = forward(static, tokens)
    drop = {layer: loads.drop_rate for layer, loads in stats.layer_loads(out.routings, mask).items()}
    assert all(rate > 0 for rate in drop.values()), drop
    dropped = [int((~np.asarray(r.keep)).sum()) for r in out.routings]
    assert [round(drop[i] * tokens.size * 2) for i in range(2)] == dropped
    assert np.abs(np.asarray(out.logits) - np.asarray(model(tokens))).max() > 1e-3  # not the dropless logits
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a slot for every token: no drop, no warning; dynamic: no warning
        roomy = parallel.expert_parallel(model, mesh, gating="static", capacity_fraction=1.0)
        parallel.expert_parallel(model, mesh)
    assert all(l.drop_rate == 0 for l in stats.layer_loads(forward(roomy, tokens).routings, mask).values())
