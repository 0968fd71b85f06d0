"""The building blocks of the encoder-decoder families against torch: LayerNorm (with and without bias)."""

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
