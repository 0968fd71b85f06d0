"""The plain-jnp references: f32, every row through every expert, each row keeping its own expert's result.
Slow and obviously correct; every other implementation is tested against them."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from moejax.kernels.base import Activation, Implementation, as_expert_weights, computed_groups, ffn, stacked, with_bias


def grouped_ffn_reference(x, group_sizes, *weights, activation: Activation = "silu",
                          capacity: int | None = None) -> jax.Array:
    """grouped_ffn's semantics in f32 (a scan over experts); rows of no group (padding, past a capacity) -> 0.
    weights: ExpertWeights' fields in order (gate, up, down, gate_bias, up_bias, down_bias), or one ExpertWeights
    or SplitExperts."""
    weights = stacked(as_expert_weights(weights))
    xf = x.astype(jnp.float32)
    project = lambda a, w, b: with_bias(a @ w, b)

    def expert(out, e_weights):
        e, w = e_weights
        return jnp.where((group == e)[:, None], ffn(xf, w, activation, project), out), None

    group = computed_groups(group_sizes, x.shape[0], capacity)
    f32 = jax.tree.map(lambda w: w.astype(jnp.float32), weights)
    out, _ = jax.lax.scan(expert, jnp.zeros(x.shape, jnp.float32), (jnp.arange(group_sizes.shape[0]), f32))
    return out.astype(x.dtype)


def grouped_matmul_reference(x, group_sizes, w, *, capacity: int | None = None) -> jax.Array:
    """Plain jnp in f32, as grouped_ffn_reference: row r of group e -> x[r] @ w[e]; other rows -> 0."""
    group = computed_groups(group_sizes, x.shape[0], capacity)
    y = jnp.einsum("nd,edf->nef", x.astype(jnp.float32), w.astype(jnp.float32))
    mine = group[:, None] == jnp.arange(group_sizes.shape[0])
    return jnp.where(mine[:, :, None], y, 0).sum(axis=1).astype(x.dtype)


@dataclasses.dataclass(frozen=True)
class Reference(Implementation):
    name: ClassVar[str] = "reference"

    def _ffn(self, x, group_sizes, weights, *, activation, capacity):
        return grouped_ffn_reference(x, group_sizes, weights, activation=activation, capacity=capacity)

    def _matmul(self, x, group_sizes, w, *, capacity):
        return grouped_matmul_reference(x, group_sizes, w, capacity=capacity)
