"""jax.lax.ragged_dot: differentiable, on every backend; the path for GPUs before Hopper and for shapes the
Mosaic GPU kernels do not take, and the dropless training path."""

from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar

import jax
import jax.numpy as jnp

from moejax.kernels.base import ACTIVATIONS, Implementation, zero_uncomputed_rows


@dataclasses.dataclass(frozen=True)
class RaggedDot(Implementation):
    """Computes every row (padding and rows past a capacity included), then zeroes the ones not kept."""
    name: ClassVar[str] = "ragged_dot"

    def _ffn(self, x, group_sizes, w_gate, w_up, w_down, *, activation, capacity):
        act = ACTIVATIONS[activation]
        dot = functools.partial(jax.lax.ragged_dot, group_sizes=_padding_into_last_group(group_sizes, x.shape[0]),
                                preferred_element_type=jnp.float32)
        h = act(dot(x, w_gate)) * dot(x, w_up)
        out = dot(h.astype(x.dtype), w_down)
        return zero_uncomputed_rows(out, group_sizes, capacity).astype(x.dtype)

    def _matmul(self, x, group_sizes, w, *, capacity):
        out = jax.lax.ragged_dot(x, w, _padding_into_last_group(group_sizes, x.shape[0]),
                                 preferred_element_type=jnp.float32)
        return zero_uncomputed_rows(out, group_sizes, capacity).astype(x.dtype)


def _padding_into_last_group(group_sizes: jax.Array, n: int) -> jax.Array:
    """ragged_dot needs sizes that sum to N: the padding rows join the last group (and are zeroed after)."""
    return group_sizes.astype(jnp.int32).at[-1].add(n - group_sizes.sum().astype(jnp.int32))
