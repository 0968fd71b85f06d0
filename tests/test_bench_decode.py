"""experiments/bench_decode.py: the bytes one batch-1 decode step must read, counted by hand for a small
model (the roofline's numerator)."""

import os
import sys

import moejax

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments"))

import bench_decode  # noqa: E402


def test_a_decode_step_reads_every_weight_but_the_unchosen_experts_and_the_embedding_table():
    d, f, e, k, layers, vocab, h, hkv, hd = 32, 48, 8, 2, 3, 96, 4, 2, 8
    config = moejax.ModelConfig(architecture="mixtral", vocab_size=vocab, hidden_size=d, num_layers=layers,
                                num_heads=h, num_kv_heads=hkv, head_dim=hd, moe_layers=(True,) * layers,
                                num_experts=e, num_experts_per_tok=k, moe_intermediate_size=f,
                                intermediate_size=f, norm_topk_prob=True)
    model = moejax.random_model(config, seed=0)
    per_layer = (d * h * hd + 2 * d * hkv * hd + h * hd * d  # q, k, v, o
                 + 2 * d  # the two norms
                 + d * e  # router
                 + k * 3 * d * f)  # the chosen experts
    weights = 4 * (layers * per_layer + d + d * vocab + d)  # + final norm, the head, one embedding row
    kv = 4 * layers * 2 * hkv * hd * (10 + 6 / 2)  # K and V of the mean filled slots over 6 steps
    assert bench_decode.step_bytes(model, 10, 6) == {"weights": weights, "kv_cache": kv, "total": weights + kv}
