"""The building blocks of the encoder-decoder families against torch and transformers: LayerNorm (with and
without bias), attention with an additive bias, T5's relative position buckets, NLLB's sinusoidal positions."""

import numpy as np
import pytest
import torch

from moejax.models.layers import LayerNorm


@pytest.mark.parametrize("bias", [True, False])
def test_layer_norm_equals_torch_layer_norm(bias):
    rng = np.random.default_rng(0)
    x = rng.normal(2.0, 3.0, (3, 5, 16)).astype(np.float32)
    reference = torch.nn.LayerNorm(16, eps=1e-5, bias=bias)
    with torch.no_grad():
        reference.weight.copy_(torch.from_numpy(rng.normal(size=16).astype(np.float32)))
        if bias:
            reference.bias.copy_(torch.from_numpy(rng.normal(size=16).astype(np.float32)))
        expected = reference(torch.from_numpy(x)).numpy()
    norm = LayerNorm(16, 1e-5, bias=bias)
    norm.weight[...] = reference.weight.detach().numpy()
    if bias:
        norm.bias[...] = reference.bias.detach().numpy()
    else:
        assert norm.bias is None
    np.testing.assert_allclose(np.asarray(norm(x)), expected, rtol=1e-5, atol=1e-5)


def _biased_case(seed, b=2, t=21, s=21, h=4, hkv=2, d=8):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(b, t, h, d)).astype(np.float32)
    k = rng.normal(size=(b, s, hkv, d)).astype(np.float32)
    v = rng.normal(size=(b, s, hkv, d)).astype(np.float32)
    bias = rng.normal(size=(1, h, t, s)).astype(np.float32) * 3
    allowed = np.tril(np.ones((t, s), bool))[None].repeat(b, 0)
    allowed[1, :, :4] = False  # row 1's first keys are padding
    allowed[1, :4] = False
    return q, k, v, bias, allowed


def _numpy_attention(q, k, v, bias, allowed, scale):
    """softmax(q k^T * scale + bias, masked) v, head by head (kv head = head // group)."""
    b, t, h, _ = q.shape
    group = h // k.shape[2]
    out = np.zeros(q.shape[:3] + (v.shape[-1],), np.float64)
    for head in range(h):
        logits = np.einsum("btd,bsd->bts", q[:, :, head], k[:, :, head // group]) * scale + bias[:, head]
        logits = np.where(allowed, logits, -1e30)
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        out[:, :, head] = np.einsum("bts,bsd->btd", probs / probs.sum(-1, keepdims=True), v[:, :, head // group])
    return out


def test_attention_bias_is_added_to_the_scaled_logits_in_every_implementation():
    from moejax.models import attention

    q, k, v, bias, allowed = _biased_case(0)
    expected = _numpy_attention(q, k, v, bias, allowed, 0.5)
    seen = allowed.any(-1)
    for out in (attention.reference_attention(q, k, v, allowed, 0.5, bias),
                attention.tiled_attention(q, k, v, allowed, 0.5, 0, 8, bias=bias),
                attention.fused_attention(q, k, v, allowed, 0.5, "xla", bias)):
        np.testing.assert_allclose(np.asarray(out)[seen], expected[seen], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("num_buckets, max_distance", [(32, 128), (8, 16), (6, 20)])
@pytest.mark.parametrize("bidirectional", [True, False])
def test_relative_position_buckets_equal_transformers(num_buckets, max_distance, bidirectional):
    from transformers.models.switch_transformers.modeling_switch_transformers import SwitchTransformersAttention

    from moejax.seq2seq.model import RelativePositionBias, relative_position_buckets

    relative = torch.arange(-3 * max_distance, 3 * max_distance + 1)
    expected = SwitchTransformersAttention._relative_position_bucket(relative, bidirectional, num_buckets, max_distance)
    table = relative_position_buckets(num_buckets, max_distance, bidirectional)
    index = np.clip(relative.numpy(), -max_distance, max_distance) + max_distance  # how RelativePositionBias reads it
    np.testing.assert_array_equal(table[index], expected.numpy())
    assert RelativePositionBias  # the module that indexes the table this way


def test_sinusoidal_positions_equal_transformers_table():
    from transformers.models.nllb_moe.modeling_nllb_moe import NllbMoeSinusoidalPositionalEmbedding

    from moejax.seq2seq.model import nllb_positions, sinusoidal_embeddings

    for dim, pad in ((32, 1), (17, 3)):
        table = NllbMoeSinusoidalPositionalEmbedding.get_embedding(600, dim, pad).numpy()
        tokens = np.array([[7, 8, pad, 9, 10] + [11] * 500, [pad, pad, 5, 6, 7] + [8] * 500])
        positions = np.asarray(nllb_positions(tokens, pad, 0))
        expected_positions = NllbMoeSinusoidalPositionalEmbedding.create_position_ids_from_input_ids(
            torch.tensor(tokens), pad).numpy()
        np.testing.assert_array_equal(positions, expected_positions)
        np.testing.assert_allclose(np.asarray(sinusoidal_embeddings(positions, dim, pad)), table[expected_positions],
                                   rtol=0, atol=5e-5)  # float32 sin / cos of angles up to ~500 rad
