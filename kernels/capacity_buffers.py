"""Switch/GShard capacity buffers: the first `capacity` rows of each group gathered into dense [E, C, d]
buffers, one batched dense FFN (or matmul) over them, the results scattered back to row order; rows past a
group's capacity and padding come out 0. Differentiable and fast on every backend, at the price of
computing every buffer slot, filled or not; it needs a capacity (the buffer size)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from moejax.kernels.base import (Activation, Implementation, as_expert_weights, check_activation, check_expert_weights,
                                 computed_groups, ffn, rank_in_group, stacked)


def batched_ffn(buffers: jax.Array, *weights, activation: Activation = "silu") -> jax.Array:
    """Per expert e: the FFN of expert e (kernels.ExpertWeights) on every row of buffers[e].

    buffers [E, C, d]; weights: ExpertWeights' fields in order (gate, up, down[, biases]) or one ExpertWeights,
    gate, up [E, d, f], down [E, f, d] -> [E, C, d]. Every slot is computed, empty ones included (static
    shapes). f32 accumulation; the hidden goes to the down projection in buffers.dtype, as in every
    grouped_ffn implementation; output dtype = buffers.dtype."""
    if buffers.ndim != 3:
        raise ValueError(f"buffers must be [experts, capacity, d]; got shape {buffers.shape}")
    weights = stacked(as_expert_weights(weights))
    check_expert_weights(weights, buffers.shape[0], buffers.shape[2], f"buffers {buffers.shape}")
    check_activation(activation, weights.gated)

    def project(a, w, b):
        y = jnp.einsum("ecd,edf->ecf", a, w, preferred_element_type=jnp.float32)
        return y if b is None else y + b[:, None, :].astype(jnp.float32)

    return ffn(buffers, weights, activation, project).astype(buffers.dtype)


def gather_buffers(rows: jax.Array, group_sizes: jax.Array, capacity: int) -> jax.Array:
    """rows [N, d] sorted by group -> [E, capacity, d]: slot s of buffer e holds group e's row s, 0 past its count."""
    n = rows.shape[0]
    starts = jnp.cumsum(group_sizes) - group_sizes
    slot = jnp.arange(capacity)
    index = jnp.minimum(starts[:, None] + slot[None, :], n - 1)
    filled = slot[None, :] < group_sizes[:, None]
    return jnp.where(filled[..., None], rows[index], 0).astype(rows.dtype)


def scatter_rows(buffers: jax.Array, group_sizes: jax.Array, n: int) -> jax.Array:
    """gather_buffers' inverse: [E, C, k] -> [N, k] in row order; rows in no buffer (past a capacity, padding) -> 0."""
    num_groups, capacity = buffers.shape[:2]
    group = computed_groups(group_sizes, n, capacity)
    slot = jnp.clip(rank_in_group(group_sizes, n), 0, capacity - 1)
    taken = buffers[jnp.minimum(group, num_groups - 1), slot]
    return jnp.where((group < num_groups)[:, None], taken, 0)


@dataclasses.dataclass(frozen=True)
class CapacityBuffers(Implementation):
    name: ClassVar[str] = "capacity_buffers"

    def supported(self, x, weights, *, capacity):
        del x, weights
        if capacity is None:
            return "capacity buffers need capacity= (the rows each group's buffer holds)"
        return None

    def _ffn(self, x, group_sizes, weights, *, activation, capacity):
        if x.shape[0] == 0 or capacity <= 0:
            return jnp.zeros_like(x)
        buffers = gather_buffers(x, group_sizes, capacity)
        out = batched_ffn(buffers, weights, activation=activation)
        return scatter_rows(out, group_sizes, x.shape[0])

    def _matmul(self, x, group_sizes, w, *, capacity):
        if x.shape[0] == 0 or capacity <= 0:
            return jnp.zeros((x.shape[0], w.shape[-1]), x.dtype)
        buffers = gather_buffers(x, group_sizes, capacity)
        out = jnp.einsum("ecd,edf->ecf", buffers, w, preferred_element_type=jnp.float32).astype(x.dtype)
        return scatter_rows(out, group_sizes, x.shape[0])
