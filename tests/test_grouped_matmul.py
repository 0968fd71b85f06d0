"""The grouped expert matmuls against their plain-jnp references, for every implementation."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.kernels import grouped_ffn, grouped_ffn_reference, grouped_matmul, grouped_matmul_reference

IMPLEMENTATIONS = ["xla", "pallas_interpret", "ragged_dot", "auto"]
D, F = 16, 24


def _weights(e, dtype, seed=0):
    rs = np.random.RandomState(seed)
    return tuple(jnp.asarray(rs.randn(*s) * 0.3, dtype) for s in ((e, D, F), (e, D, F), (e, F, D)))


# group sizes as (sizes, total rows N): empty groups, one group with every row, sizes that fill no tile,
# padding rows past the sum, fewer rows than one tile, more groups than rows (a decode step)
CASES = {
    "random-with-empty": ([5, 0, 17, 3, 0, 9], 40),
    "one-group-has-all": ([0, 0, 37, 0], 37),
    "no-full-tile": ([7, 1, 2], 10),
    "padding-rows": ([3, 4], 16),
    "decode-many-groups": ([0, 1, 0, 0, 2, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0], 4),
    "larger-than-a-tile": ([300, 0, 45, 140], 520),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_grouped_ffn_matches_reference_f32(case, implementation):
    sizes, n = CASES[case]
    w = _weights(len(sizes), jnp.float32)
    x = jnp.asarray(np.random.RandomState(1).randn(n, D), jnp.float32)
    gs = jnp.asarray(sizes, jnp.int32)
    fn = jax.jit(functools.partial(grouped_ffn, implementation=implementation))
    out = np.asarray(fn(x, gs, *w))
    ref = np.asarray(grouped_ffn_reference(x, gs, *w))
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    assert (out[sum(sizes):] == 0).all()  # padding rows are exactly zero
    assert np.abs(ref[:sum(sizes)]).max() > 0.1


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("capacity", [1, 4, 200])
def test_counts_above_capacity_are_truncated(implementation, capacity):
    """Only each group's first `capacity` rows are computed; the rest come out 0."""
    sizes, n = CASES["larger-than-a-tile"]
    w = _weights(len(sizes), jnp.float32, seed=9)
    x = jnp.asarray(np.random.RandomState(10).randn(n, D), jnp.float32)
    gs = jnp.asarray(sizes, jnp.int32)
    out = np.asarray(grouped_ffn(x, gs, *w, implementation=implementation, capacity=capacity))
    full = np.asarray(grouped_ffn_reference(x, gs, *w))
    starts = np.cumsum([0] + sizes[:-1])
    expected = np.zeros_like(full)
    for start, size in zip(starts, sizes):
        keep = min(size, capacity)
        expected[start:start + keep] = full[start:start + keep]
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    wm = jnp.asarray(np.random.RandomState(11).randn(len(sizes), D, F), jnp.float32)
    unfused = grouped_matmul(x, gs, wm, implementation=implementation, capacity=capacity)
    np.testing.assert_allclose(np.asarray(unfused), np.asarray(grouped_matmul_reference(x, gs, wm, capacity=capacity)),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tile", [8, 16, 64])
def test_every_tile_size_matches(tile):
    sizes, n = CASES["larger-than-a-tile"]
    w = _weights(len(sizes), jnp.float32, seed=2)
    x = jnp.asarray(np.random.RandomState(3).randn(n, D), jnp.float32)
    gs = jnp.asarray(sizes, jnp.int32)
    out = grouped_ffn(x, gs, *w, implementation="xla", tile=tile)
    np.testing.assert_allclose(np.asarray(out), np.asarray(grouped_ffn_reference(x, gs, *w)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("implementation", ["xla", "pallas_interpret"])
@pytest.mark.parametrize("activation", ["silu", "gelu", "gelu_exact", "relu"])
def test_activations(activation, implementation):
    sizes, n = CASES["random-with-empty"]
    w = _weights(len(sizes), jnp.float32)
    x = jnp.asarray(np.random.RandomState(4).randn(n, D), jnp.float32)
    gs = jnp.asarray(sizes, jnp.int32)
    out = grouped_ffn(x, gs, *w, activation=activation, implementation=implementation)
    ref = grouped_ffn_reference(x, gs, *w, activation=activation)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_bfloat16_accumulates_in_float32(implementation):
    sizes, n = CASES["larger-than-a-tile"]
    w = _weights(len(sizes), jnp.bfloat16)
    x = jnp.asarray(np.random.RandomState(5).randn(n, D), jnp.bfloat16)
    gs = jnp.asarray(sizes, jnp.int32)
    out = grouped_ffn(x, gs, *w, implementation=implementation)
    assert out.dtype == jnp.bfloat16
    ref = grouped_ffn_reference(x, gs, *w)  # computed in f32 from the same bf16 inputs
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_grouped_matmul_matches_reference(implementation):
    sizes, n = CASES["random-with-empty"]
    w = jnp.asarray(np.random.RandomState(6).randn(len(sizes), D, F), jnp.float32)
    x = jnp.asarray(np.random.RandomState(7).randn(n, D), jnp.float32)
    gs = jnp.asarray(sizes, jnp.int32)
    out = grouped_matmul(x, gs, w, implementation=implementation)
    np.testing.assert_allclose(np.asarray(out), np.asarray(grouped_matmul_reference(x, gs, w)), rtol=1e-5, atol=1e-5)
    ragged = jax.lax.ragged_dot(x[:sum(sizes)], w, gs)  # the semantics are ragged_dot's
    np.testing.assert_allclose(np.asarray(out)[:sum(sizes)], np.asarray(ragged), rtol=1e-5, atol=1e-5)


def test_ragged_dot_path_is_differentiable():
    sizes, n = CASES["no-full-tile"]
    w = _weights(len(sizes), jnp.float32)
    x = jnp.asarray(np.random.RandomState(8).randn(n, D), jnp.float32)
    gs = jnp.asarray(sizes, jnp.int32)
    loss = lambda impl: lambda w0: (grouped_ffn(x, gs, w0, w[1], w[2], implementation=impl) ** 2).sum()
    np.testing.assert_allclose(np.asarray(jax.grad(loss("ragged_dot"))(w[0])),
                               np.asarray(jax.grad(loss("reference"))(w[0])), rtol=1e-4, atol=1e-5)


def test_bad_input_is_named():
    w = _weights(3, jnp.float32)
    x = jnp.zeros((4, D))
    gs = jnp.asarray([1, 2, 1])
    with pytest.raises(ValueError, match="w_up has shape"):
        grouped_ffn(x, gs, w[0], w[1][:, :, :5], w[2])
    with pytest.raises(ValueError, match="unknown activation 'swish2'"):
        grouped_ffn(x, gs, *w, activation="swish2")
    with pytest.raises(ValueError, match="unknown implementation 'triton'"):
        grouped_ffn(x, gs, *w, implementation="triton")
    with pytest.raises(ValueError, match=r"x must be \[rows, d\]"):
        grouped_ffn(x[None], gs, *w)
