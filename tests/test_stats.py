"""Load statistics and the straggler latency model against plain numpy."""

import jax.numpy as jnp
import numpy as np

import moejax
from moejax import placement, stats
from moejax.generate import pad_prompts
from tests.tiny import tiny_config


def test_layer_loads_count_routed_and_kept_pairs():
    model = moejax.with_policy(moejax.random_model(tiny_config(num_experts=8), seed=1),
                               moejax.MoEPolicy(capacity_factor=0.5))
    tokens, mask = pad_prompts([[1, 2, 3, 4, 5], list(range(10, 30))], bucket=8)
    out = model.forward(jnp.asarray(tokens), token_mask=jnp.asarray(mask))
    loads = stats.layer_loads(out.routings, jnp.asarray(mask), top_k=2)
    assert sorted(loads) == [0, 1]
    for layer, l in loads.items():
        r = out.routings[layer]
        experts, keep = np.asarray(r.experts), np.asarray(r.keep)
        real = mask.reshape(-1)
        np.testing.assert_array_equal(l.routed, np.bincount(experts[real].ravel(), minlength=8))
        np.testing.assert_array_equal(l.kept, np.bincount(experts[keep], minlength=8))
        np.testing.assert_array_equal(l.kept_of_routed, l.kept)  # token drop keeps only routed pairs
        assert l.tokens == 25 and l.routed.sum() == 50
        assert l.kept.max() <= moejax.capacity.expert_capacity(25, 2, 8, 0.5)
        assert l.tokens_without_experts == int((real & ~keep.any(-1)).sum())
        assert np.isclose(l.drop_rate, 1 - keep.sum() / 50)
        assert np.isclose(l.routed_max_over_mean, l.routed.max() / l.routed.mean())


def test_latency_model_waits_for_the_busiest_device():
    routed = np.asarray([10, 2, 2, 2, 6, 6, 2, 2])  # device loads (contiguous, 4 devices): 12, 4, 12, 4
    kept = np.asarray([4, 2, 2, 2, 4, 4, 2, 2])  # 6, 4, 8, 4
    device_of_expert = placement.contiguous(8, 4)
    np.testing.assert_array_equal(stats.device_loads(routed, device_of_expert, 4), [12, 4, 12, 4])
    assert np.isclose(stats.modelled_layer_time(routed, device_of_expert, 4), 12 / 8)
    assert np.isclose(stats.modelled_speedup(routed, kept, device_of_expert, 4), 12 / 8)
    assert np.isclose(stats.modelled_layer_time(np.full(8, 3), device_of_expert, 4), 1.0)
    assert float(stats.max_over_mean(jnp.asarray([0, 0, 0]))) == 0.0


def test_expanded_drop_rate_counts_only_routed_pairs():
    model = moejax.with_policy(moejax.random_model(tiny_config(num_experts=8), seed=1),
                               moejax.MoEPolicy(capacity_factor=1.0, expanded="local", num_devices=4))
    tokens = jnp.asarray(np.random.RandomState(0).randint(0, 64, size=(2, 16)))
    out = model.forward(tokens)
    for layer, l in stats.layer_loads(out.routings, jnp.ones((2, 16), bool), top_k=2).items():
        keep = np.asarray(out.routings[layer].keep)
        assert l.kept.sum() == keep.sum() and l.kept_of_routed.sum() == keep[:, :2].sum()
        assert np.isclose(l.drop_rate, 1 - keep[:, :2].sum() / 64) and 0 <= l.drop_rate < 1
