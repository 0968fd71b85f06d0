"""Grouped matmuls over rows sorted by expert, the experts step of a MoE block: one public op per entry
point (grouped_ffn, grouped_matmul), several backend implementations behind `implementation=`.

Layout and capacity as in kernels/base.py: x [N, d] holds the rows of group 0, then group 1, ...; rows past
sum(group_sizes) are padding and come out as exactly 0; with `capacity`, only the first min(count,
capacity) rows of each group are computed, the rest come out 0 (capacity-aware drop at the kernel level).

`implementation=` takes
  - a name from IMPLEMENTATIONS:
      "xla"               the tiled loop over active experts, fastest on the CPU (kernels/xla.py)
      "pallas"            TPU kernels over a static grid of visits (kernels/pallas.py);
      "pallas_interpret"  the same in interpret mode on any backend (the tests)
      "mosaic_gpu"        Hopper kernels, wgmma and TMA, bf16/f16 (kernels/mosaic_gpu.py);
      "mosaic_gpu_interpret"  the same in GPU interpret mode on the CPU (the tests)
      "ragged_dot"        jax.lax.ragged_dot: differentiable, every backend (kernels/ragged_dot.py)
      "capacity_buffers"  dense [E, capacity, d] buffers: differentiable, needs capacity= (kernels/capacity_buffers.py)
      "reference"         plain jnp in f32, slow, obviously correct (kernels/reference.py)
      "auto"              the backend's order, default_implementation();
  - an implementation object with its own config, e.g. Xla(XlaConfig(tile=256));
  - or a sequence of these, tried in order (a tuple, to pass it as a static argument of a jitted function).
An implementation that cannot serve a call raises NotImplementedError: within a sequence (and "auto") the
next one is tried; a single one named by the caller raises ValueError saying why.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Callable, Sequence, Union

import jax

from moejax.kernels.base import (ACTIVATIONS, Activation, ClampedSwiGLU, ExpertWeights, Implementation, SplitExperts,
                                 as_expert_weights, check_inputs)
from moejax.kernels.capacity_buffers import CapacityBuffers, batched_ffn
from moejax.kernels.ragged_dot import RaggedDot
from moejax.kernels.reference import Reference, grouped_ffn_reference, grouped_matmul_reference
from moejax.kernels.xla import Xla, XlaConfig

_REGISTRY: dict[str, Implementation] = {}


def _register(*implementations: Implementation) -> None:
    for implementation in implementations:
        _REGISTRY[implementation.name] = implementation


_register(Xla(), RaggedDot(), CapacityBuffers(), Reference())
# The Pallas backends need jax.experimental.pallas's TPU and Mosaic GPU modules: where one does not import,
# its implementations are left out and the others still serve.
try:
    from moejax.kernels.pallas import Pallas, PallasConfig
except ImportError:
    Pallas = PallasConfig = None
else:
    _register(Pallas(), Pallas(interpret=True))
try:
    from moejax.kernels.mosaic_gpu import MosaicGpu, MosaicGpuConfig, TileConfig, is_hopper_or_newer
except ImportError:
    MosaicGpu = MosaicGpuConfig = TileConfig = None
else:
    _register(MosaicGpu(), MosaicGpu(interpret=True))

IMPLEMENTATIONS: tuple[str, ...] = ("auto", *_REGISTRY)
ImplementationLike = Union[str, Implementation, Sequence[Union[str, Implementation]]]


def default_implementation() -> tuple[str, ...]:
    """The one place the backend picks the experts step: the names "auto" tries, in order."""
    backend = jax.default_backend()
    if backend == "gpu":
        hopper = MosaicGpu is not None and is_hopper_or_newer()
        order = ("mosaic_gpu", "ragged_dot") if hopper else ("ragged_dot",)
    else:
        # the Pallas kernels take no expert biases: ragged_dot serves those calls
        order = {"cpu": ("xla",), "tpu": ("pallas", "ragged_dot")}.get(backend, ("ragged_dot",))
    return tuple(name for name in order if name in _REGISTRY)


def _candidates(implementation: ImplementationLike) -> tuple[list[Implementation], bool]:
    """(the implementations to try, in order; whether the caller named exactly one)."""
    items = list(implementation) if isinstance(implementation, (list, tuple)) else [implementation]
    if not items:
        raise ValueError("implementation= is an empty sequence")
    single = len(items) == 1 and not (isinstance(items[0], str) and items[0] == "auto")
    found = []
    for item in items:
        if isinstance(item, Implementation):
            found.append(item)
        elif isinstance(item, str) and item == "auto":
            found.extend(_REGISTRY[name] for name in default_implementation())
        elif isinstance(item, str) and item in _REGISTRY:
            found.append(_REGISTRY[item])
        else:
            raise ValueError(f"unknown implementation {item!r}; supported: {IMPLEMENTATIONS}, an Implementation "
                             "object, or a sequence of them")
    return found, single


def _first_that_serves(implementation: ImplementationLike, call: Callable[[Implementation], jax.Array]) -> jax.Array:
    candidates, single = _candidates(implementation)
    reasons = []
    for candidate in candidates:
        try:
            return call(candidate)
        except NotImplementedError as e:
            if single:
                raise ValueError(f"implementation {candidate.name!r} cannot take these inputs: {e}") from e
            reasons.append(f"{candidate.name}: {e}")
    raise ValueError(f"no implementation of {implementation!r} can take these inputs: " + "; ".join(reasons))


def grouped_ffn(x: jax.Array, group_sizes: jax.Array, *weights, activation: Activation = "silu",
                implementation: ImplementationLike = "auto", capacity: int | None = None) -> jax.Array:
    """Per row r of group e: expert e's FFN on x[r] (see ExpertWeights), e.g. the gated
    (act(x[r] @ w_gate[e]) * (x[r] @ w_up[e])) @ w_down[e]; rows not computed -> 0.

    x [N, d]; group_sizes int [E]; weights: ExpertWeights' fields in order, w_gate (None: not gated), w_up
    [E, d, f], w_down [E, f, d], then optional gate_bias, up_bias [E, f], down_bias [E, d] (or one
    ExpertWeights, or one SplitExperts: each expert's own arrays, read in place by "xla", stacked for the
    others) -> [N, d]. activation: a name of ACTIVATIONS or a ClampedSwiGLU. f32 accumulation; output
    dtype = x.dtype."""
    weights = as_expert_weights(weights)
    check_inputs(x, group_sizes, weights, activation)
    return _first_that_serves(implementation, lambda impl: impl.ffn(
        x, group_sizes, weights, activation=activation, capacity=capacity))


def grouped_matmul(x: jax.Array, group_sizes: jax.Array, w: jax.Array, *,
                   implementation: ImplementationLike = "auto", capacity: int | None = None) -> jax.Array:
    """ragged_dot semantics: row r of group e -> x[r] @ w[e]; x [N, d], w [E, d, f] -> [N, f]; rows not
    computed -> 0."""
    check_inputs(x, group_sizes, w)
    return _first_that_serves(implementation, lambda impl: impl.matmul(x, group_sizes, w, capacity=capacity))


def autotune(x, group_sizes, *weights, implementation: str | Implementation = "xla", configs=None,
             activation: Activation = "silu", capacity: int | None = None, repeats: int = 3) -> Implementation:
    """The implementation with its fastest config for these shapes and this routing, timed here; pass it as
    implementation=. `configs` defaults to the implementation's autotuning_configs(). For benchmarks and for
    users who run one shape many times; without it, each implementation uses its own heuristic."""
    candidates, single = _candidates(implementation)
    if not single:
        raise ValueError(f"autotune times the configs of one implementation; got {implementation!r}")
    base = candidates[0]
    best, best_time = None, float("inf")
    for config in base.autotuning_configs() if configs is None else configs:
        candidate = dataclasses.replace(base, config=config)
        fn = jax.jit(functools.partial(grouped_ffn, activation=activation, implementation=candidate,
                                       capacity=capacity))
        jax.block_until_ready(fn(x, group_sizes, *weights))
        start = time.perf_counter()
        for _ in range(repeats):
            jax.block_until_ready(fn(x, group_sizes, *weights))
        elapsed = time.perf_counter() - start
        if elapsed < best_time:
            best, best_time = candidate, elapsed
    return best


__all__ = ["ACTIVATIONS", "IMPLEMENTATIONS", "Activation", "CapacityBuffers", "ClampedSwiGLU", "ExpertWeights",
           "Implementation", "ImplementationLike", "MosaicGpu", "MosaicGpuConfig", "Pallas", "PallasConfig",
           "RaggedDot", "Reference", "SplitExperts", "TileConfig", "Xla", "XlaConfig", "autotune", "batched_ffn",
           "default_implementation", "grouped_ffn", "grouped_ffn_reference", "grouped_matmul",
           "grouped_matmul_reference"]
