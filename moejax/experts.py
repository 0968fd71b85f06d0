"""Experts backends: how a MoE block computes its routed experts, behind one small protocol.

    backend(x [N, d], routing, weights, layout, activation) -> ExpertsOutput(out [N, d], kept [N, k], needed)

`weights` is a `moejax.kernels.ExpertWeights` (gated or not, with or without biases: every backend takes
each kind, mapping over its present leaves), or a `kernels.SplitExperts` where the block holds each expert's
weights as arrays of their own (resident and capacity_buffers take those; moejax.models.EXPERT_STORAGES);
`activation` a hashable value, a name of kernels.ACTIVATIONS or a kernels.ClampedSwiGLU (GPT-OSS), part of
the compiled program.

`out` is the weighted sum over each token's computed pairs (the combine of routed experts; the block adds
its shared experts), `kept` the pairs actually computed (a backend may compute fewer than the policy kept:
capacity buffers, static gating), `needed` a count the caller may act on (dynamic gating's bucket).

A backend is a frozen, hashable object (it is part of the compiled program) carrying its own config, and
says where it can run (`supported(layout)`: None, or why not). They live in `BACKENDS`, by name:
  resident          every expert in device memory, the grouped FFN of `moejax.kernels` (implementation=...)
  capacity_buffers  Switch/GShard capacity buffers: each expert computes at most ceil(factor * N * k / E)
                    of its pairs in one dense batched matmul; differentiable and fast everywhere (training)
  expert_parallel   `moejax.parallel.ExpertParallel`: experts sharded over the layout's mesh
  buffered          `moejax.buffering.slots.Buffered`: experts in a host store, a few device slots; stateful
                    (`stateful = True`: called with the block's ExpertState and returning the next one)
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Protocol

import jax
import jax.numpy as jnp
from flax import nnx

from moejax import dispatch, kernels
from moejax.capacity import expert_capacity
from moejax.kernels import Activation, ExpertWeights  # noqa: F401 (ExpertWeights: the protocol's weights, re-exported)
from moejax.layout import Layout
from moejax.routing import Routing


class ExpertsOutput(NamedTuple):
    out: jax.Array  # [N, d]: sum over the computed pairs of weight * expert output
    kept: jax.Array  # bool [N, k]: the pairs computed
    needed: jax.Array  # int32: dynamic gating's largest (source, destination) count; 0 elsewhere


class ExpertsBackend(Protocol):
    name: str

    def supported(self, layout: Layout | None) -> str | None: ...

    def __call__(self, x: jax.Array, routing: Routing, weights: ExpertWeights, layout: Layout | None,
                 activation: Activation) -> ExpertsOutput: ...


class ExpertState(nnx.Variable):
    """A stateful backend's state on a MoE block (buffered experts: the slots and the policy's clocks): not a
    parameter; decode loops carry it from step to step."""


def _on_one_device(name: str, layout: Layout | None) -> str | None:
    if layout is not None and layout.mesh is not None:
        return f"{name} runs on one device; the layout has a mesh (use moejax.parallel.expert_parallel)"
    return None


@dataclasses.dataclass(frozen=True)
class Resident:
    """Every expert in device memory: dispatch, the grouped FFN, combine. `implementation`: of
    `moejax.kernels.grouped_ffn` (a name or an implementation object; "auto": the backend's fastest)."""

    implementation: object = "auto"
    name = "resident"

    def supported(self, layout):
        return _on_one_device(self.name, layout)

    def __call__(self, x, routing, weights, layout, activation):
        sent = dispatch.dispatch(x, routing)
        y = kernels.grouped_ffn(sent.rows, sent.group_sizes, weights, activation=activation,
                                implementation=self.implementation)
        return ExpertsOutput(dispatch.combine(y, sent, routing), routing.keep, jnp.zeros((), jnp.int32))


@dataclasses.dataclass(frozen=True)
class CapacityBuffers:
    """Each expert computes its first ceil(capacity_factor * N * k / E) pairs in token order (N counts every
    row, padding included: a static size); the rest pass through the residual only."""

    capacity_factor: float = 2.0
    name = "capacity_buffers"

    def __post_init__(self):
        if not self.capacity_factor > 0:
            raise ValueError(f"CapacityBuffers: capacity_factor={self.capacity_factor!r} must be > 0")

    def supported(self, layout):
        return _on_one_device(self.name, layout)

    def __call__(self, x, routing, weights, layout, activation):
        num_tokens, top_k = routing.experts.shape
        num_experts = routing.scores.shape[-1]
        capacity = expert_capacity(num_tokens, top_k, num_experts, self.capacity_factor)
        sent = dispatch.dispatch(x, routing)
        y = kernels.grouped_ffn(sent.rows, sent.group_sizes, weights, activation=activation,
                                implementation="capacity_buffers", capacity=capacity)
        # a row's rank inside its expert's group decides whether it fit
        starts = jnp.cumsum(sent.group_sizes) - sent.group_sizes
        group = jnp.where(routing.keep, routing.experts, num_experts).reshape(-1)[sent.order]
        rank = jnp.arange(group.shape[0]) - jnp.concatenate([starts, jnp.zeros((1,), starts.dtype)])[group]
        fits = jnp.zeros(group.shape, bool).at[sent.order].set((group < num_experts) & (rank < capacity))
        kept = fits.reshape(num_tokens, top_k)
        return ExpertsOutput(dispatch.combine(y, sent, routing._replace(keep=kept)), kept, jnp.zeros((), jnp.int32))


BACKENDS: dict[str, type] = {"resident": Resident, "capacity_buffers": CapacityBuffers}


def register(cls: type) -> type:
    """Add a backend class to BACKENDS under its `name` (moejax.parallel registers expert_parallel)."""
    BACKENDS[cls.name] = cls
    return cls


def backend(spec, **config) -> ExpertsBackend:
    """A backend from a name in BACKENDS (with its config as keywords) or a backend object as it is."""
    if isinstance(spec, str):
        if spec not in BACKENDS:
            raise ValueError(f"unknown experts backend {spec!r}; supported: {sorted(BACKENDS)}")
        return BACKENDS[spec](**config)
    if config:
        raise ValueError(f"experts backend {spec!r} is an object; its config goes in its constructor")
    if not callable(spec) or not hasattr(spec, "supported"):
        raise TypeError(f"an experts backend needs __call__ and supported(layout); got {spec!r}")
    return spec
