"""The grouped expert matmuls against their plain-jnp references, for every implementation, under jax.jit;
the registry that picks an implementation; batched_ffn.

Shapes are tiny and shared between cases (group_sizes is traced), so each implementation compiles a few
times only and the file runs in seconds."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax import kernels
from moejax.kernels import (ACTIVATIONS, IMPLEMENTATIONS, ClampedSwiGLU, ExpertWeights, SplitExperts, batched_ffn,
                            default_implementation, grouped_ffn, grouped_ffn_reference, grouped_matmul,
                            grouped_matmul_reference)
from moejax.kernels.base import as_expert_weights

D, F = 16, 24
# one jitted reference for the whole file: compiled once per shape and activation
_reference = jax.jit(grouped_ffn_reference, static_argnames=("activation", "capacity"))

# Group sizes over the same N = 40 rows and 6 groups (one compile serves them all): empty groups, one group
# with every row, sizes that fill no tile, padding rows past the sum (which must come out exactly 0).
SAME_SHAPE = {
    "random-with-empty": [5, 0, 17, 3, 0, 9],
    "one-group-has-all": [0, 0, 40, 0, 0, 0],
    "no-full-tile": [7, 1, 2, 0, 3, 6],
    "padding-rows": [3, 4, 0, 0, 2, 0],
    "all-padding": [0, 0, 0, 0, 0, 0],
}
# (group sizes, N): more groups than rows (a decode step, N below one tile), and groups of several tiles
# plus a remainder (default tile 128, remainder tile 32 at this N).
OTHER_SHAPES = {
    "decode-many-groups": ([0, 1, 0, 0, 2, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0], 4),
    "several-tiles": ([600, 0, 45, 140, 200], 1000),
}


def _inputs(sizes, n, dtype=jnp.float32, seed=0):
    rs = np.random.RandomState(seed)
    e = len(sizes)
    w = tuple(jnp.asarray(rs.randn(*s) * 0.3, dtype) for s in ((e, D, F), (e, D, F), (e, F, D)))
    return jnp.asarray(rs.randn(n, D), dtype), jnp.asarray(sizes, jnp.int32), w


def _check_ffn(fn, sizes, n, **kwargs):
    x, gs, w = _inputs(sizes, n)
    out = np.asarray(fn(x, gs, *w))
    ref = np.asarray(_reference(x, gs, *w, **kwargs))
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    assert (out[sum(sizes):] == 0).all()  # padding rows are exactly zero
    assert sum(sizes) == 0 or np.abs(ref[:sum(sizes)]).max() > 0.1


def _truncated(full, sizes, capacity):
    """The reference's rows kept by a capacity: each group's first `capacity`, the rest 0."""
    expected = np.zeros_like(full)
    for start, size in zip(np.cumsum([0] + sizes[:-1]), sizes):
        keep = min(size, capacity)
        expected[start:start + keep] = full[start:start + keep]
    return expected


# The FFN kinds beyond the plain gated one (kernels.ExpertWeights): (gated, biased, activation).
FFN_KINDS = {
    "gated-biases": (True, True, "silu"),
    "non-gated": (False, False, "relu"),  # Switch Transformers
    "non-gated-biases": (False, True, "gelu"),  # NLLB-MoE
    "clamped-swiglu-biases": (True, True, ClampedSwiGLU(limit=0.7)),  # GPT-OSS; the limit clamps these values
    "clamped-swiglu": (True, False, ClampedSwiGLU(limit=0.7)),
}


def _kind_weights(kind, sizes, n, seed=11):
    """(x, group_sizes, ExpertWeights, activation) of one of FFN_KINDS."""
    gated, biased, activation = FFN_KINDS[kind]
    x, gs, (wg, wu, wd) = _inputs(sizes, n, seed=seed)
    rs = np.random.RandomState(seed + 1)
    bias = lambda shape: jnp.asarray(rs.randn(*shape) * 0.5, jnp.float32) if biased else None
    e = len(sizes)
    weights = ExpertWeights(wg if gated else None, wu, wd, bias((e, F)) if gated else None, bias((e, F)), bias((e, D)))
    return x, gs, weights, activation


def _per_token_ffn(x, group_sizes, weights: ExpertWeights, activation, capacity=None):
    """numpy, one row at a time: row r of group e (among its group's first `capacity`) through expert e's FFN."""
    act = lambda a: np.asarray(ACTIVATIONS[activation](jnp.asarray(a))) if isinstance(activation, str) else None
    w = {name: None if v is None else np.asarray(v, np.float64) for name, v in weights._asdict().items()}
    plus = lambda y, b, e: y if b is None else y + b[e]
    out = np.zeros(x.shape)
    row = 0
    for e, size in enumerate(np.asarray(group_sizes)):
        for rank in range(size):
            if capacity is None or rank < capacity:
                xr = np.asarray(x[row], np.float64)
                up = plus(xr @ w["up"][e], w["up_bias"], e)
                if w["gate"] is None:
                    hidden = act(up)
                else:
                    gate = plus(xr @ w["gate"][e], w["gate_bias"], e)
                    if isinstance(activation, ClampedSwiGLU):  # GPT-OSS's _apply_gate, written out
                        g, u = np.minimum(gate, activation.limit), np.clip(up, -activation.limit, activation.limit)
                        hidden = (u + 1) * g / (1 + np.exp(-activation.alpha * g))
                    else:
                        hidden = act(gate) * up
                out[row] = plus(hidden @ w["down"][e], w["down_bias"], e)
            row += 1
    return out


@pytest.mark.parametrize("kind", FFN_KINDS)
def test_the_reference_is_the_per_token_ffn(kind):
    sizes = SAME_SHAPE["random-with-empty"]
    x, gs, weights, activation = _kind_weights(kind, sizes, 40)
    for capacity in (None, 4):
        ref = np.asarray(_reference(x, gs, *weights, activation=activation, capacity=capacity))
        np.testing.assert_allclose(ref, _per_token_ffn(x, gs, weights, activation, capacity), rtol=1e-5, atol=1e-5)
    assert (ref[sum(sizes):] == 0).all() and np.abs(ref).max() > 0.1


def test_a_clamped_swiglu_clamps():
    """The test values reach past the limit, so the clamps are exercised (a larger limit changes the result)."""
    x, gs, weights, activation = _kind_weights("clamped-swiglu-biases", SAME_SHAPE["random-with-empty"], 40)
    loose = _reference(x, gs, *weights, activation=ClampedSwiGLU(limit=100.0))
    assert np.abs(np.asarray(loose) - np.asarray(_reference(x, gs, *weights, activation=activation))).max() > 1e-2


class ImplementationTests:
    """What every implementation must do; one subclass per implementation sets `implementation`."""
    implementation = None
    # the capacity passed where a test wants no drop: None, or (for implementations that need one) a
    # capacity no group here reaches
    no_drop_capacity = None
    differentiable = False
    takes_biases = True  # else: a call with biases is refused by name (the registry falls through)

    split_experts = False  # grouped_ffn gets the weights as SplitExperts (each expert its own arrays)

    def _fn(self, entry=grouped_ffn, **kwargs):
        kwargs.setdefault("capacity", self.no_drop_capacity)
        fn = functools.partial(entry, implementation=self.implementation, **kwargs)
        if self.split_experts and entry is grouped_ffn:
            return lambda x, gs, *w: fn(x, gs, SplitExperts.of(as_expert_weights(w)))
        return fn

    def test_grouped_ffn_matches_reference_f32(self):
        fn = jax.jit(self._fn())
        for sizes in SAME_SHAPE.values():
            _check_ffn(fn, sizes, 40)
        for sizes, n in OTHER_SHAPES.values():
            _check_ffn(fn, sizes, n)

    def test_activations(self):
        x, gs, w = _inputs(SAME_SHAPE["random-with-empty"], 40, seed=4)
        # every activation in one jitted program: one compile instead of four
        outs = jax.jit(lambda *args: {a: self._fn(activation=a)(*args) for a in ACTIVATIONS})(x, gs, *w)
        for activation, out in outs.items():
            np.testing.assert_allclose(np.asarray(out), np.asarray(_reference(x, gs, *w, activation=activation)),
                                       rtol=1e-5, atol=1e-5, err_msg=activation)

    def test_bfloat16_accumulates_in_float32(self):
        sizes, n = OTHER_SHAPES["several-tiles"]
        x, gs, w = _inputs(sizes, n, jnp.bfloat16, seed=5)
        out = jax.jit(self._fn())(x, gs, *w)
        assert out.dtype == jnp.bfloat16
        ref = _reference(x, gs, *w)  # f32 math from the same bf16 inputs
        np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), rtol=3e-2, atol=3e-2)
        assert (np.asarray(out, np.float32)[sum(sizes):] == 0).all()

    def test_grouped_matmul_matches_reference(self):
        sizes = SAME_SHAPE["random-with-empty"]
        x, gs, _ = _inputs(sizes, 40)
        w = jnp.asarray(np.random.RandomState(6).randn(len(sizes), D, F), jnp.float32)
        out = np.asarray(jax.jit(self._fn(grouped_matmul))(x, gs, w))
        np.testing.assert_allclose(out, np.asarray(grouped_matmul_reference(x, gs, w)), rtol=1e-5, atol=1e-5)
        ragged = jax.lax.ragged_dot(x[:sum(sizes)], w, gs)  # the semantics are ragged_dot's
        np.testing.assert_allclose(out[:sum(sizes)], np.asarray(ragged), rtol=1e-5, atol=1e-5)
        assert (out[sum(sizes):] == 0).all()

    def test_counts_above_capacity_are_truncated(self):
        """Only each group's first `capacity` rows are computed; the rest come out 0."""
        sizes, n = OTHER_SHAPES["several-tiles"]
        x, gs, w = _inputs(sizes, n, seed=9)
        capacities = (1, 100)
        outs = jax.jit(lambda *args: [self._fn(capacity=c)(*args) for c in capacities])(x, gs, *w)
        full = np.asarray(_reference(x, gs, *w))
        for capacity, out in zip(capacities, outs):
            np.testing.assert_allclose(np.asarray(out), _truncated(full, sizes, capacity), rtol=1e-5, atol=1e-5,
                                       err_msg=f"capacity {capacity}")

    def test_biases_non_gated_and_clamped_swiglu_match_the_reference(self):
        sizes = SAME_SHAPE["random-with-empty"]
        for kind, (_, biased, _) in FFN_KINDS.items():
            x, gs, weights, activation = _kind_weights(kind, sizes, 40)
            fn = jax.jit(self._fn(activation=activation))
            if biased and not self.takes_biases:
                with pytest.raises(ValueError, match="cannot take these inputs: .* no expert biases"):
                    fn(x, gs, *weights)
                continue
            for capacity in {self.no_drop_capacity, 4}:
                out = np.asarray(jax.jit(self._fn(activation=activation, capacity=capacity))(x, gs, *weights))
                ref = np.asarray(_reference(x, gs, *weights, activation=activation, capacity=capacity))
                np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5, err_msg=f"{kind}, capacity {capacity}")
                assert (out[sum(sizes):] == 0).all()

    def test_gradients_match_the_reference(self):
        if not self.differentiable:
            pytest.skip(f"{self.implementation} is not reverse-differentiable")
        x, gs, w = _inputs(SAME_SHAPE["no-full-tile"], 40)
        capacity = 3 if self.no_drop_capacity is None else self.no_drop_capacity

        def grad(fn):
            loss = lambda x, *w: (jnp.sin(fn(x, gs, *w)) ** 2).sum()
            return jax.grad(loss, argnums=(0, 1, 2, 3))(x, *w)

        for kwargs in ({}, {"capacity": capacity}):
            ours = grad(self._fn(**kwargs))
            theirs = grad(functools.partial(grouped_ffn_reference, capacity=kwargs.get("capacity")))
            for a, b in zip(ours, theirs):
                np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5, err_msg=str(kwargs))
        # every leaf of a biased, non-gated and a clamped FFN (training NLLB-MoE / GPT-OSS experts)
        for kind in ("non-gated-biases", "clamped-swiglu-biases"):
            x, gs, weights, activation = _kind_weights(kind, SAME_SHAPE["no-full-tile"], 40)
            loss = lambda fn: jax.grad(lambda x, w: (jnp.sin(fn(x, gs, w)) ** 2).sum(), argnums=(0, 1))(x, weights)
            ours = loss(self._fn(activation=activation, capacity=capacity))
            theirs = loss(functools.partial(grouped_ffn_reference, activation=activation, capacity=capacity))
            for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
                np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5, err_msg=kind)


class TestXla(ImplementationTests):
    implementation = "xla"


class TestXlaSplitExperts(ImplementationTests):
    """The switch over each expert's own arrays (a decode step that reads the weights in place)."""
    implementation = "xla"
    split_experts = True


class TestPallasInterpret(ImplementationTests):
    implementation = "pallas_interpret"
    takes_biases = False


class TestRaggedDot(ImplementationTests):
    implementation = "ragged_dot"
    differentiable = True


class TestCapacityBuffers(ImplementationTests):
    implementation = "capacity_buffers"
    no_drop_capacity = 1000  # the largest N here: buffers that hold every row
    differentiable = True


def test_the_shapes_exercise_the_tiles():
    """The cases above cover N below a tile, remainders, and full tiles followed by a remainder."""
    assert kernels.Xla().tiles(4, 16) == (1, 1)  # decode: one-row tiles, one loop
    assert kernels.Xla().tiles(40, 6) == (4, 4)
    assert kernels.Xla().tiles(1000, 5) == (128, 32)
    assert kernels.Xla(kernels.XlaConfig(tile=64)).tiles(1000, 5) == (64, 16)


@pytest.mark.parametrize("tile", [8, 16, 64])
def test_every_tile_size_matches(tile):
    """An xla implementation object carrying its own tile computes the same result."""
    sizes, n = OTHER_SHAPES["several-tiles"]
    _check_ffn(jax.jit(functools.partial(grouped_ffn, implementation=kernels.Xla(kernels.XlaConfig(tile=tile)))),
               sizes, n)


def test_pallas_with_its_own_tiles_matches():
    tiles = kernels.PallasConfig(tiles=(8, 16, 8), down_tiles=(8, 8, 16))  # d = 16, f = 24
    fn = jax.jit(functools.partial(grouped_ffn, implementation=kernels.Pallas(tiles, interpret=True)))
    _check_ffn(fn, SAME_SHAPE["random-with-empty"], 40)
    x, gs, w = _inputs(SAME_SHAPE["random-with-empty"], 40)
    with pytest.raises(ValueError, match=r"'pallas_interpret' cannot take these inputs: tiles \(tk=16, tn=16\) "
                                         "must divide the reduction 16 and the output 24"):
        grouped_ffn(x, gs, *w, implementation=kernels.Pallas(kernels.PallasConfig(tiles=(8, 16, 16)), interpret=True))


def test_gelu_is_the_tanh_approximation():
    x, gs, w = _inputs(SAME_SHAPE["random-with-empty"], 40)
    approx, exact = (_reference(x, gs, *w, activation=a) for a in ("gelu", "gelu_exact"))
    assert np.abs(np.asarray(approx) - np.asarray(exact)).max() > 1e-4


def test_auto_and_reference_dispatch():
    """"auto" is the xla path on the CPU, "reference" is grouped_ffn_reference: the same traced programs."""
    assert default_implementation() == ("xla",)  # the tests run on the CPU backend
    x, gs, w = _inputs(SAME_SHAPE["no-full-tile"], 40)
    program = lambda fn, **kw: str(jax.make_jaxpr(functools.partial(fn, **kw))(x, gs, *w))
    assert program(grouped_ffn) == program(grouped_ffn, implementation="xla")
    assert program(grouped_ffn, implementation="xla") == program(grouped_ffn, implementation=kernels.Xla())
    assert program(grouped_ffn, implementation="reference") == program(grouped_ffn_reference)


@dataclasses.dataclass(frozen=True)
class _Refuses(kernels.Implementation):
    """An implementation that can serve no call."""
    name = "refuses"

    def supported(self, x, weights, *, capacity):
        return "it never can"


def test_a_sequence_falls_through_to_the_next_implementation():
    x, gs, w = _inputs(SAME_SHAPE["random-with-empty"], 40)
    program = lambda **kw: str(jax.make_jaxpr(functools.partial(grouped_ffn, **kw))(x, gs, *w))
    assert program(implementation=[_Refuses(), "xla"]) == program(implementation="xla")
    # capacity buffers cannot serve a call without a capacity: the next one does
    assert program(implementation=("capacity_buffers", "reference")) == program(implementation="reference")
    assert program(implementation=["auto"]) == program(implementation="xla")
    # a lone implementation that cannot serve says why, as does a sequence of them
    with pytest.raises(ValueError, match="implementation 'refuses' cannot take these inputs: it never can"):
        grouped_ffn(x, gs, *w, implementation=_Refuses())
    with pytest.raises(ValueError, match="'capacity_buffers' cannot take these inputs: capacity buffers need capacity="):
        grouped_ffn(x, gs, *w, implementation="capacity_buffers")
    with pytest.raises(ValueError, match="no implementation .* refuses: it never can; capacity_buffers: capacity"):
        grouped_ffn(x, gs, *w, implementation=[_Refuses(), "capacity_buffers"])


def test_registry_names():
    assert IMPLEMENTATIONS[0] == "auto"
    assert {"xla", "pallas", "pallas_interpret", "mosaic_gpu", "mosaic_gpu_interpret", "ragged_dot",
            "capacity_buffers", "reference"} <= set(IMPLEMENTATIONS)
    with pytest.raises(ValueError, match="XlaConfig.tile must be a positive row count or None; got 0"):
        kernels.XlaConfig(tile=0)
    with pytest.raises(ValueError, match="the two kernels share visits: block_m 64 != 128"):
        kernels.MosaicGpuConfig(gate_up=kernels.TileConfig(block_m=64))


def test_autotune_returns_the_implementation_with_the_fastest_config():
    sizes, n = OTHER_SHAPES["several-tiles"]
    x, gs, w = _inputs(sizes, n)
    configs = (kernels.XlaConfig(tile=16), kernels.XlaConfig(tile=64))
    best = kernels.autotune(x, gs, *w, configs=configs, repeats=1)
    assert isinstance(best, kernels.Xla) and best.config in configs
    np.testing.assert_allclose(np.asarray(grouped_ffn(x, gs, *w, implementation=best)),
                               np.asarray(_reference(x, gs, *w)), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="autotune times the configs of one implementation"):
        kernels.autotune(x, gs, *w, implementation=["xla", "ragged_dot"])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_batched_ffn_is_a_dense_ffn_per_expert(dtype):
    rs = np.random.RandomState(7)
    e, c = 3, 5
    buffers = jnp.asarray(rs.randn(e, c, D), dtype)
    w = tuple(jnp.asarray(rs.randn(*s) * 0.3, dtype) for s in ((e, D, F), (e, D, F), (e, F, D)))
    out = jax.jit(functools.partial(batched_ffn, activation="gelu"))(buffers, *w)
    assert out.shape == (e, c, D) and out.dtype == dtype
    f32 = lambda a: np.asarray(a, np.float32)
    for i in range(e):
        b, (wg, wu, wd) = f32(buffers[i]), (f32(a[i]) for a in w)
        hidden = np.asarray(ACTIVATIONS["gelu"](jnp.asarray(b @ wg))) * (b @ wu)
        # the hidden goes to the down projection in the buffers' dtype
        expected = f32(jnp.asarray(hidden).astype(dtype)) @ wd
        tol = 1e-5 if dtype == jnp.float32 else 3e-2
        np.testing.assert_allclose(f32(out[i]), expected, rtol=tol, atol=tol, err_msg=f"expert {i}")
    with pytest.raises(ValueError, match=r"w_down has shape \(3, 16, 24\); expected \(3, 24, 16\)"):
        batched_ffn(buffers, w[0], w[1], w[0])
    with pytest.raises(ValueError, match=r"buffers must be \[experts, capacity, d\]"):
        batched_ffn(buffers[0], *w)


def test_bad_input_is_named():
    x, gs, w = _inputs([1, 2, 1], 4)
    with pytest.raises(ValueError, match=r"w_up has shape \(3, 16, 5\); expected \(3, 16, 24\)"):
        grouped_ffn(x, gs, w[0], w[1][:, :, :5], w[2])
    with pytest.raises(ValueError, match=r"w_down has shape \(2, 24, 16\); expected \(3, 24, 16\)"):
        grouped_ffn(x, gs, w[0], w[1], w[2][:2])
    with pytest.raises(ValueError, match=r"w_gate has shape \(3, 16, 24\); expected \(3, 8, 24\)"):
        grouped_ffn(x[:, :8], gs, *w)
    with pytest.raises(ValueError, match=r"x must be \[rows, d\]"):
        grouped_ffn(x[None], gs, *w)
    with pytest.raises(ValueError, match="group_sizes must be an int vector"):
        grouped_ffn(x, gs.astype(jnp.float32), *w)
    with pytest.raises(ValueError, match=r"w has shape \(3, 8, 24\); expected \(3, 16, 24\)"):
        grouped_matmul(x, gs, w[0][:, :8])
    with pytest.raises(ValueError, match="unknown activation 'swish2'"):
        grouped_ffn(x, gs, *w, activation="swish2")
    biases = (jnp.zeros((3, F)), jnp.zeros((3, F)), jnp.zeros((3, D)))
    with pytest.raises(ValueError, match=r"down_bias has shape \(3, 24\); expected \(3, 16\)"):
        grouped_ffn(x, gs, *w, *biases[:2], biases[0])
    with pytest.raises(ValueError, match="gate_bias is given but gate is None"):
        grouped_ffn(x, gs, None, w[1], w[2], *biases)
    with pytest.raises(ValueError, match="ClampedSwiGLU.* is a gated activation; the experts have no gate weights"):
        grouped_ffn(x, gs, None, w[1], w[2], activation=ClampedSwiGLU(limit=7.0))
    with pytest.raises(ValueError, match="expected the expert weights .* got 2 arrays"):
        grouped_ffn(x, gs, w[0], w[1])
    with pytest.raises(ValueError, match="unknown implementation 'triton'"):
        grouped_ffn(x, gs, *w, implementation="triton")
    with pytest.raises(ValueError, match="unknown implementation 'triton'"):
        grouped_matmul(x, gs, w[0], implementation="triton")
    with pytest.raises(ValueError, match="unknown implementation 'triton'"):
        grouped_ffn(x, gs, *w, implementation=["xla", "triton"])
    with pytest.raises(ValueError, match="implementation= is an empty sequence"):
        grouped_ffn(x, gs, *w, implementation=[])


def test_split_experts_are_the_stacked_experts_one_by_one():
    x, gs, weights, _ = _kind_weights("gated-biases", SAME_SHAPE["random-with-empty"], 40)
    split = SplitExperts.of(weights)
    assert split.num_experts == 6 and split.gated and split.experts[2].up.shape == (D, F)
    np.testing.assert_array_equal(np.asarray(split.experts[2].down_bias), np.asarray(weights.down_bias[2]))
    for got, want in zip(jax.tree.leaves(split.stacked()), jax.tree.leaves(weights)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_split_experts_train_through_an_implementation_that_stacks_them():
    """ragged_dot takes split experts stacked: the loss and its gradients with respect to each expert's own
    arrays are the reference's on the stacked weights."""
    x, gs, weights, activation = _kind_weights("gated-biases", SAME_SHAPE["no-full-tile"], 40)

    def loss(fn, w):
        return (jnp.sin(fn(x, gs, w, activation=activation)) ** 2).sum()

    ours = jax.value_and_grad(functools.partial(loss, functools.partial(grouped_ffn, implementation="ragged_dot")))
    value, grads = ours(SplitExperts.of(weights))
    ref_value, ref_grads = jax.value_and_grad(functools.partial(loss, grouped_ffn_reference))(weights)
    np.testing.assert_allclose(float(value), float(ref_value), rtol=1e-5)
    assert isinstance(grads, SplitExperts)
    for got, want in zip(jax.tree.leaves(grads.stacked()), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-5)


def test_bad_split_experts_are_named():
    x, gs, w = _inputs([1, 2, 1], 4)
    split = SplitExperts.of(ExpertWeights(*w))
    with pytest.raises(ValueError, match=r"2 split experts given for x \(4, 16\) and 3 groups"):
        grouped_ffn(x, gs, SplitExperts(split.experts[:2]))
    with pytest.raises(ValueError, match=r"w_up has shape \(16, 5\); expected \(16, 24\) for expert 1 of x"):
        grouped_ffn(x, gs, SplitExperts(split.experts[:1] + (split.experts[1]._replace(up=w[1][1, :, :5]),)
                                        + split.experts[2:]))
    with pytest.raises(ValueError, match=r"split expert 2 has the fields \['up', 'down'\]; expert 0 has "
                                         r"\['gate', 'up', 'down'\]"):
        grouped_ffn(x, gs, SplitExperts(split.experts[:2] + (split.experts[2]._replace(gate=None),)))


# The Mosaic GPU kernels in GPU interpret mode (simulated SMEM, TMA, wgmma): bf16 only, widths of whole
# 64-column tiles, the default 128-row tiles. N = 200 leaves the last row tile part outside the rows (read
# as NaN by the interpreter) and unwritten output memory is NaN there too, so a row stored by the wrong
# visit, or never stored, shows.
MOSAIC_D, MOSAIC_F = 64, 128
MOSAIC_CASES = {
    "random-with-empty": [45, 0, 77, 3, 0, 50],
    "one-group-has-all": [0, 0, 200, 0, 0, 0],
    "no-full-tile-and-padding": [7, 1, 20, 0, 3, 6],
}


def _mosaic_inputs(sizes, n, seed):
    rs = np.random.RandomState(seed)
    e = len(sizes)
    shapes = ((e, MOSAIC_D, MOSAIC_F), (e, MOSAIC_D, MOSAIC_F), (e, MOSAIC_F, MOSAIC_D))
    w = tuple(jnp.asarray(rs.randn(*s) / np.sqrt(s[1]), jnp.bfloat16) for s in shapes)
    return jnp.asarray(rs.randn(n, MOSAIC_D), jnp.bfloat16), jnp.asarray(sizes, jnp.int32), w


@pytest.mark.slow
def test_mosaic_gpu_kernels_in_interpret_mode():
    """Fused SwiGLU (with and without a capacity) and the plain grouped matmul against the references."""
    fns = {
        "ffn": jax.jit(functools.partial(grouped_ffn, implementation="mosaic_gpu_interpret")),
        "ffn-capacity-30": jax.jit(functools.partial(grouped_ffn, implementation="mosaic_gpu_interpret",
                                                     capacity=30)),
        "matmul": jax.jit(functools.partial(grouped_matmul, implementation="mosaic_gpu_interpret")),
        "ffn-non-gated": jax.jit(lambda x, gs, *w: grouped_ffn(x, gs, None, *w[1:], activation="relu",
                                                               implementation="mosaic_gpu_interpret")),
    }
    for seed, (case, sizes) in enumerate(MOSAIC_CASES.items()):
        x, gs, w = _mosaic_inputs(sizes, 200, seed)
        expected = {"ffn": _reference(x, gs, *w), "ffn-capacity-30": _reference(x, gs, *w, capacity=30),
                    "matmul": grouped_matmul_reference(x, gs, w[0]),
                    "ffn-non-gated": _reference(x, gs, None, *w[1:], activation="relu")}
        for name, fn in fns.items():
            out = fn(x, gs, w[0]) if name == "matmul" else fn(x, gs, *w)
            out, ref = np.asarray(out, np.float32), np.asarray(expected[name], np.float32)
            assert np.isfinite(out).all(), f"{case}/{name}: a row was never stored or stored from outside"
            # bf16 h between the two projections, as the reference does not round: bf16-level agreement
            np.testing.assert_allclose(out, ref, rtol=2e-2, atol=2e-2, err_msg=f"{case}/{name}")
            assert (out[sum(sizes):] == 0).all()
            assert np.abs(ref).max() > 0.1


def test_mosaic_gpu_takes_bf16_only_and_says_so():
    x, gs, w = _mosaic_inputs([100, 100], 200, 0)
    with pytest.raises(ValueError, match="'mosaic_gpu' cannot take these inputs: wgmma operands here are bf16/f16; "
                                         "got float32"):
        grouped_ffn(x.astype(jnp.float32), gs, *(a.astype(jnp.float32) for a in w), implementation="mosaic_gpu")
    with pytest.raises(ValueError, match="reduction dimension 40 is not a multiple of 64"):
        grouped_matmul(x[:, :40], gs, w[0][:, :40], implementation="mosaic_gpu")


def _on_hopper() -> bool:
    return jax.default_backend() == "gpu" and default_implementation()[:1] == ("mosaic_gpu",)


@pytest.mark.skipif(not _on_hopper(), reason="needs a Hopper GPU (run with JAX_PLATFORMS=cuda on one)")
@pytest.mark.parametrize("shape", [(1000, 256, 512, 8), (4096, 1024, 2048, 64), (100, 512, 1024, 16)])
def test_mosaic_gpu_on_the_gpu(shape):
    """The compiled kernels (wgmma, TMA) against the f32 reference: skewed groups with empty ones, a
    capacity, N not a multiple of the row tile; every row written (no NaN from unwritten memory)."""
    n, d, f, e = shape
    rs = np.random.RandomState(n)
    sizes = rs.multinomial(n - 7, rs.dirichlet(np.full(e, 0.3)))  # skewed, some empty, 7 padding rows
    x = jnp.asarray(rs.randn(n, d), jnp.bfloat16)
    w = tuple(jnp.asarray(rs.randn(*s) / np.sqrt(s[1]), jnp.bfloat16) for s in ((e, d, f), (e, d, f), (e, f, d)))
    gs = jnp.asarray(sizes, jnp.int32)
    for capacity in (None, int(sizes.max()) // 2 + 1):
        out = np.asarray(jax.jit(functools.partial(grouped_ffn, capacity=capacity))(x, gs, *w), np.float32)
        ref = np.asarray(grouped_ffn_reference(x, gs, *w, capacity=capacity), np.float32)
        assert np.isfinite(out).all()
        assert np.linalg.norm(out - ref) / np.linalg.norm(ref) < 1e-2, capacity
        assert (out[n - 7:] == 0).all()
    out = np.asarray(jax.jit(grouped_matmul)(x, gs, w[0]), np.float32)
    ref = np.asarray(grouped_matmul_reference(x, gs, w[0]), np.float32)
    assert np.linalg.norm(out - ref) / np.linalg.norm(ref) < 1e-2
