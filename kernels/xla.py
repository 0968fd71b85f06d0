"""The XLA tiled loop: the fast grouped FFN on the CPU.

A loop over the *active* experts (dynamic trip count); each expert's rows go through in full tiles
(dynamic_slice of rows, a dynamic_update_slice back), then its remainder in smaller tiles, the last slid back
to end at the group's end, so skew wastes less than one small tile per expert and a decode step computes
only its few active experts. No gathers, scatters or padded buffers. Stacked weights [E, d, f] are sliced
once per active expert, which XLA:CPU does as a copy; SplitExperts (each expert its own arrays) are read in
place by a lax.switch over the experts, whose branch e closes over expert e's arrays. On a 2-core CPU,
d=512 f=1024 E=8 top-2 2048 tokens, it runs at 0.9-1.2x the speed of a dense FFN of equal useful FLOPs,
balanced or skewed, f32 or bf16, where jax.lax.ragged_dot reaches ~0.12
(experiments/results/bench_grouped_matmul_cpu.txt). Not reverse-differentiable (dynamic loops): training
uses "ragged_dot" or "capacity_buffers".
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from moejax.kernels.base import Activation, Implementation, SplitExperts, ffn, with_bias


def default_tile(num_rows: int, num_groups: int) -> tuple[int, int]:
    """(tile, remainder_tile). The tile is the largest power of two within the rows an expert gets on
    average, in [1, 512]: large enough to amortise XLA:CPU's few-microsecond loop step and keep the dot
    efficient (256 and 512 measured best at d=512, f=1024, 8 experts, balanced and skewed), small enough
    that a decode step with a row or two per expert computes no rows it does not need (XLA:CPU's one-row
    dot is a matrix-vector product, markedly faster than a dot of a few rows)."""
    per_group = max(1, -(-num_rows // max(1, num_groups)))
    tile = min(512, 1 << (per_group.bit_length() - 1))
    return tile, remainder_tile(tile)


def remainder_tile(tile: int) -> int:
    """A group's last rows go in tiles a quarter of `tile` (at least 8 rows, at most `tile`), so skew wastes
    less than one small tile per expert."""
    return min(tile, max(8, tile // 4))


@dataclasses.dataclass(frozen=True)
class XlaConfig:
    """tile: rows per full tile (remainder tiles: remainder_tile(tile)); None: default_tile's
    heuristic for the call's rows and groups."""
    tile: int | None = None

    def __post_init__(self):
        if self.tile is not None and self.tile < 1:
            raise ValueError(f"XlaConfig.tile must be a positive row count or None; got {self.tile}")


@dataclasses.dataclass(frozen=True)
class Xla(Implementation):
    """The tiled loop over active experts; runs on every backend, fastest on the CPU."""
    name: ClassVar[str] = "xla"
    takes_split_experts: ClassVar[bool] = True
    config: XlaConfig = XlaConfig()

    def tiles(self, num_rows: int, num_groups: int) -> tuple[int, int]:
        """(tile, remainder_tile) this implementation uses for num_rows rows over num_groups groups."""
        if self.config.tile is None:
            return default_tile(num_rows, num_groups)
        return self.config.tile, remainder_tile(self.config.tile)

    def autotuning_configs(self) -> tuple[XlaConfig, ...]:
        return tuple(XlaConfig(tile=t) for t in (64, 128, 256, 512))

    def _ffn(self, x, group_sizes, weights, *, activation, capacity):
        return self._tiled(x, group_sizes, weights, ffn_rows(activation), x.shape[1], capacity)

    def _matmul(self, x, group_sizes, w, *, capacity):
        return self._tiled(x, group_sizes, w, lambda rows, w: jnp.dot(rows, w, preferred_element_type=jnp.float32),
                           w.shape[-1], capacity)

    def _tiled(self, x, group_sizes, weights, compute, out_dim: int, capacity: int | None) -> jax.Array:
        """Loop over the active experts; per expert, its weights (a slice of stacked ones, or its own arrays
        of SplitExperts), its rows through in full tiles, then its remainder in smaller tiles. No gathers or
        scatter-adds: each tile is a dynamic_slice of rows and a dynamic_update_slice whose rows outside the
        group keep their values."""
        n = x.shape[0]
        if n == 0:
            return jnp.zeros((0, out_dim), x.dtype)
        num_groups = group_sizes.shape[0]
        group_sizes = group_sizes.astype(jnp.int32)
        tile, small = self.tiles(n, num_groups)
        tile = min(tile, n)  # a tile never holds more rows than there are
        small = min(small, tile)
        starts = jnp.cumsum(group_sizes) - group_sizes
        if capacity is not None:  # rows keep their places; only the first `capacity` of each group are computed
            group_sizes = jnp.minimum(group_sizes, capacity)
        active = jnp.nonzero(group_sizes > 0, size=min(num_groups, n), fill_value=0)[0]
        x_bits = bits(x)

        if isinstance(weights, SplitExperts):
            # per tile, a switch whose branch e closes over expert e's own arrays: its dots read them where
            # they are, and only the tile's rows go in and out of the conditional
            branches = [lambda rows, expert=expert: compute(rows, expert) for expert in weights.experts]
            expert_compute = lambda rows, e: jax.lax.switch(e, branches, rows)
            expert_weights = lambda e: e
        else:
            weights_bits = jax.tree.map(bits, weights)
            expert_compute = compute
            # one copy per expert, of every leaf (weights: an ExpertWeights, or one matrix)
            expert_weights = lambda e: jax.tree.map(lambda w, b: unbits(b[e], w.dtype), weights, weights_bits)

        def pick(e, out):
            return group_rows(out, x_bits, x.dtype, starts[e], starts[e] + group_sizes[e], expert_weights(e),
                              expert_compute, tile, small)

        # f32 output buffer, cast once at the end: XLA:CPU widens bf16 elementwise ops to f32, and the update
        # of a bf16 buffer then copies the whole buffer on every tile instead of writing the tile in place.
        out = jnp.zeros((n, out_dim), jnp.float32)
        return jax.lax.fori_loop(0, jnp.sum(group_sizes > 0), lambda i, out: pick(active[i], out), out
                                 ).astype(x.dtype)


def ffn_rows(activation: Activation):
    """rows [n, d], one expert's ExpertWeights (no expert axis) -> f32 [n, d]: the expert's FFN."""
    project = lambda a, w, b: with_bias(jnp.dot(a, w, preferred_element_type=jnp.float32), b)
    return lambda rows, weights: ffn(rows, weights, activation, project)


def group_rows(out, x_bits, x_dtype, start, end, expert_weights, compute, tile: int, small: int):
    """One group's rows [start, end) of x through `compute(rows, expert_weights)`, written into out [N, out_dim]
    (f32): full tiles, then the remainder in small tiles, the last ending at the group's end and overlapping
    the one before it rather than computing rows past it. x_bits: x as `bits(x)`. expert_weights: the
    expert's weights, or whatever else `compute` takes to find them (an index to switch on). Rows outside
    the group keep their values."""
    n = x_bits.shape[0]

    def one_tile(out, row0, size):
        # Rows [row0, row0 + size), slid back to stay inside x; only rows in [start, end) are written.
        first = jnp.clip(row0, 0, n - size)
        y = compute(unbits(jax.lax.dynamic_slice_in_dim(x_bits, first, size, 0), x_dtype), expert_weights)
        index = first + jnp.arange(size)
        mine = ((index >= start) & (index < end))[:, None]
        old = jax.lax.dynamic_slice_in_dim(out, first, size, 0)
        return jax.lax.dynamic_update_slice_in_dim(out, jnp.where(mine, y, old), first, 0)

    rest = start
    if tile > small:  # else the small tiles' loop alone: one loop less to compile (decode's one-row tiles)
        full = (end - start) // tile
        out = jax.lax.fori_loop(0, full, lambda j, o: one_tile(o, start + j * tile, tile), out)
        rest = start + full * tile
    return jax.lax.fori_loop(0, (end - rest + small - 1) // small,
                             lambda j, o: one_tile(o, jnp.minimum(rest + j * small, end - small), small), out)


def bits(a: jax.Array) -> jax.Array:
    """2-byte floats as uint16 for dynamic slicing: XLA:CPU widens a bf16 dynamic-slice to f32 and hoists the
    widening out of the loop, converting every expert's weights on every call (all 64 experts for a decode
    step that uses 4). Slicing the raw bits is a plain copy of the rows or the expert taken."""
    return jax.lax.bitcast_convert_type(a, jnp.uint16) if a.dtype.itemsize == 2 else a


def unbits(a: jax.Array, dtype) -> jax.Array:
    return jax.lax.bitcast_convert_type(a, dtype) if a.dtype != dtype else a
