"""jax.lax.ragged_dot: differentiable, on every backend; the path for GPUs before Hopper and for shapes the
Mosaic GPU kernels do not take, and the dropless training path."""

from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar

import jax
import jax.numpy as jnp

from moejax.kernels.base import Implementation, ffn, group_of_rows, zero_uncomputed_rows


@dataclasses.dataclass(frozen=True)
class RaggedDot(Implementation):
    """Computes every row (padding and rows past a capacity included), then zeroes the ones not kept."""
    name: ClassVar[str] = "ragged_dot"

    def _ffn(self, x, group_sizes, weights, *, activation, capacity):
        dot = functools.partial(jax.lax.ragged_dot, group_sizes=_padding_into_last_group(group_sizes, x.shape[0]),
                                preferred_element_type=jnp.float32)
        # each row's bias is its group's (padding rows take the last group's, and are zeroed after)
        group = jnp.minimum(group_of_rows(group_sizes, x.shape[0]), group_sizes.shape[0] - 1)
        project = lambda a, w, b: dot(a, w) if b is None else dot(a, w) + b[group].astype(jnp.float32)
        out = ffn(x, weights, activation, project)
        return zero_uncomputed_rows(out, group_sizes, capacity).astype(x.dtype)

    def _matmul(self, x, group_sizes, w, *, capacity):
        out = jax.lax.ragged_dot(x, w, _padding_into_last_group(group_sizes, x.shape[0]),
                                 preferred_element_type=jnp.float32)
        return zero_uncomputed_rows(out, group_sizes, capacity).astype(x.dtype)


def _padding_into_last_group(group_sizes: jax.Array, n: int) -> jax.Array:
    """ragged_dot needs sizes that sum to N: the padding rows join the last group (and are zeroed after)."""
    return group_sizes.astype(jnp.int32).at[-1].add(n - group_sizes.sum().astype(jnp.int32))
