"""experiments/bench_forward.py: the useful matmul FLOPs of a prefill (the compute roofline's numerator),
counted from a small model's own weight shapes and a brute-force causal mask."""

import os
import sys

import numpy as np
import pytest
from flax import nnx

import moejax

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments"))

import bench_forward  # noqa: E402


def test_prefill_flops_match_the_weights_each_token_passes_and_the_causal_pairs():
    d, f, e, k, vocab, h, hkv, hd, dense_f, t = 32, 48, 8, 2, 96, 4, 2, 8, 40, 13
    config = moejax.ModelConfig(architecture="mixtral", vocab_size=vocab, hidden_size=d, num_layers=3,
                                num_heads=h, num_kv_heads=hkv, head_dim=hd, moe_layers=(True, False, True),
                                num_experts=e, num_experts_per_tok=k, moe_intermediate_size=f,
                                intermediate_size=dense_f, norm_topk_prob=True)
    model = moejax.random_model(config, seed=0)
    expected = 0
    for path, param in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        shape = param.get_value().shape
        if path == ("embed_tokens",) or len(shape) == 1:  # a lookup and the norms: no matmul
            continue
        if len(shape) == 3:  # stacked experts [E, in, out]: each token passes k of them
            expected += 2 * t * k * np.prod(shape) // shape[0]
        else:  # every token passes every other matrix once
            expected += 2 * t * np.prod(shape)
    causal_pairs = np.tril(np.ones((t, t))).sum()  # query i sees keys 0..i
    expected += 3 * 2 * 2 * h * hd * causal_pairs  # per layer: q.k scores and the weighted values
    flops = bench_forward.prefill_flops(config, t)
    assert flops["total"] == expected
    assert flops["total"] == sum(v for name, v in flops.items() if name != "total")


def test_prefill_flops_refuse_what_they_do_not_count():
    config = moejax.ModelConfig(architecture="mixtral", vocab_size=64, hidden_size=16, num_layers=1, num_heads=2,
                                num_kv_heads=2, head_dim=8, moe_layers=(True,), num_experts=4,
                                num_experts_per_tok=2, moe_intermediate_size=8, sliding_window=4)
    with pytest.raises(ValueError, match="sliding windows"):
        bench_forward.prefill_flops(config, 8)
