"""Pallas grouped matmuls in the TPU (Mosaic) layout; interpret mode on any backend for tests.

The grid is static: for each output column tile it walks the visits of kernels/visits.py in row order. Per
group only the first min(count, capacity) rows are computed (capacity-aware drop at the kernel level); a
visit with no such row skips its matmul, so the work follows the rows actually routed, never more than the
capacity. Every row tile is visited at least once, so rows that no group computes come out as 0.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from moejax.kernels.base import ExpertWeights, InterpretableKernels, expert_hidden, has_bias
from moejax.kernels.visits import visit_metadata

Tiles = tuple[int, int, int]  # (tm, tk, tn): rows, reduction and output columns per block


def tile_sizes(n: int, d: int, f: int) -> Tiles:
    """(tm, tk, tn) for an [n, d] @ [d, f] kernel. 128-multiples where the dimension allows (the TPU's MXU
    and lane width), else the whole dimension; row tiles shrink for small inputs."""
    def pick(dim, preferred):
        for t in (preferred, 256, 128):
            if t <= dim and dim % t == 0:
                return t
        return dim
    tm = min(128, max(8, 1 << max(0, n - 1).bit_length()))
    return tm, pick(d, 512), pick(f, 512)


@dataclasses.dataclass(frozen=True)
class PallasConfig:
    """tiles: (tm, tk, tn) of the grouped matmul and of the FFN's fused gate/up kernel; down_tiles: of the
    FFN's down projection. None: tile_sizes for the call's shapes."""
    tiles: Tiles | None = None
    down_tiles: Tiles | None = None


@dataclasses.dataclass(frozen=True)
class Pallas(InterpretableKernels):
    """The TPU kernels; interpret=True runs them in Pallas interpret mode on any backend."""
    base_name: ClassVar[str] = "pallas"
    config: PallasConfig = PallasConfig()

    def supported(self, x, weights, *, capacity):
        del capacity
        ffn = isinstance(weights, ExpertWeights)
        if ffn and has_bias(weights):
            return "the Pallas kernels take no expert biases"
        d, f = (weights.up if ffn else weights[0]).shape[1:]
        kernels = [(self.config.tiles, d, f)] + ([(self.config.down_tiles, f, d)] if ffn else [])
        for tiles, k, out in kernels:
            if tiles is not None and (k % tiles[1] or out % tiles[2]):
                return f"tiles (tk={tiles[1]}, tn={tiles[2]}) must divide the reduction {k} and the output {out}"
        if not self.interpret and jax.default_backend() != "tpu":
            return (f"the kernels lower to TPU Mosaic; the backend is {jax.default_backend()} "
                    "(\"pallas_interpret\" runs them in interpret mode)")
        return None

    def _ffn(self, x, group_sizes, weights, *, activation, capacity):
        h = pallas_grouped_hidden(x, group_sizes, weights.gate, weights.up, activation=activation, capacity=capacity,
                                  interpret=self.interpret, tiles=self.config.tiles)
        return pallas_grouped_matmul(h, group_sizes, weights.down, capacity=capacity, interpret=self.interpret,
                                     tiles=self.config.down_tiles)

    def _matmul(self, x, group_sizes, w, *, capacity):
        return pallas_grouped_matmul(x, group_sizes, w, capacity=capacity, interpret=self.interpret,
                                     tiles=self.config.tiles)


def _rows_to_write(meta, tm):
    group_ids, row_tiles, starts, compute_ends, num_visits = meta
    t = pl.program_id(1)
    g = group_ids[t]
    rows = row_tiles[t] * tm + jax.lax.broadcasted_iota(jnp.int32, (tm, 1), 0)
    mine = (rows >= starts[g]) & (rows < compute_ends[g]) & (t < num_visits[0])
    # does this visit compute anything? (its group's computed range meets the tile)
    tile_start = row_tiles[t] * tm
    busy = (t < num_visits[0]) & (compute_ends[g] > jnp.maximum(starts[g], tile_start)) & (
        starts[g] < tile_start + tm)
    first_visit = (t == 0) | (row_tiles[t] != row_tiles[jnp.maximum(t - 1, 0)])
    return mine, busy, first_visit


def _kernel(group_ids, row_tiles, starts, compute_ends, num_visits, x_ref, *refs, tm, epilogue):
    """One (column tile, visit, reduction step) of x @ w for each weight (refs: the weights, the output,
    one f32 accumulator per weight); the last reduction step stores epilogue(*accumulators)."""
    num_weights = (len(refs) - 1) // 2
    w_refs, o_ref, acc_refs = refs[:num_weights], refs[num_weights], refs[num_weights + 1:]
    mine, busy, first_visit = _rows_to_write((group_ids, row_tiles, starts, compute_ends, num_visits), tm)
    k = pl.program_id(2)

    @pl.when(k == 0)
    def _():
        for acc_ref in acc_refs:
            acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when(busy)
    def _():
        x = x_ref[...]
        for acc_ref, w_ref in zip(acc_refs, w_refs):
            acc_ref[...] += jnp.dot(x, w_ref[0], preferred_element_type=jnp.float32)

    @pl.when(k == pl.num_programs(2) - 1)
    def _():
        y = epilogue(*(acc_ref[...] for acc_ref in acc_refs))
        # consecutive visits of one row tile share the output block: merge this group's rows into it
        previous = jnp.where(first_visit, jnp.zeros_like(y), o_ref[...].astype(jnp.float32))
        o_ref[...] = jnp.where(mine, y, previous).astype(o_ref.dtype)


def _call(epilogue, x, weights, group_sizes, out_dim, capacity, interpret, tiles):
    n, d = x.shape
    num_groups = group_sizes.shape[0]
    tm, tk, tn = tiles or tile_sizes(n, d, out_dim)
    if d % tk or out_dim % tn:
        raise ValueError(f"tiles (tk={tk}, tn={tn}) must divide d={d} and f={out_dim}")
    padded_rows = -(-n // tm) * tm
    x_padded = jnp.pad(x, ((0, padded_rows - n), (0, 0)))
    meta, max_visits = visit_metadata(group_sizes, n, tm, capacity)
    # output columns outermost, so that the visits of one row tile (one per group in it) are consecutive
    # grid steps on the same output block, which stays resident between them
    grid = (out_dim // tn, max_visits, d // tk)
    x_spec = pl.BlockSpec((tm, tk), lambda j, t, k, g, r, *_: (r[t], k))
    w_spec = pl.BlockSpec((1, tk, tn), lambda j, t, k, g, r, *_: (jnp.minimum(g[t], num_groups - 1), k, j))
    out_spec = pl.BlockSpec((tm, tn), lambda j, t, k, g, r, *_: (r[t], j))
    spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=5, grid=grid, in_specs=[x_spec] + [w_spec] * len(weights), out_specs=out_spec,
        scratch_shapes=[pltpu.VMEM((tm, tn), jnp.float32)] * len(weights))
    out = pl.pallas_call(functools.partial(_kernel, tm=tm, epilogue=epilogue), grid_spec=spec,
                         out_shape=jax.ShapeDtypeStruct((padded_rows, out_dim), x.dtype),
                         compiler_params=pltpu.CompilerParams(
                             dimension_semantics=("parallel", "arbitrary", "arbitrary")),
                         interpret=interpret)(*meta, x_padded, *weights)
    return out[:n]


def pallas_grouped_matmul(x, group_sizes, w, *, capacity: int | None = None, interpret: bool = False,
                          tiles: Tiles | None = None):
    """x [N, d] rows sorted by group, w [E, d, f] -> [N, f]; each group computes its first min(count,
    capacity) rows; other rows -> 0."""
    return _call(lambda acc: acc, x, (w,), group_sizes, w.shape[-1], capacity, interpret, tiles)


def pallas_grouped_hidden(x, group_sizes, w_gate, w_up, *, activation="silu", capacity: int | None = None,
                          interpret: bool = False, tiles: Tiles | None = None):
    """The FFN's hidden in one kernel -> [N, f]: the fused gate/up pass, activation(x @ w_gate[e], x @ w_up[e]),
    or with w_gate None act(x @ w_up[e])."""
    weights = (w_up,) if w_gate is None else (w_gate, w_up)
    epilogue = (lambda up: expert_hidden(activation, None, up)) if w_gate is None else (
        lambda gate, up: expert_hidden(activation, gate, up))
    return _call(epilogue, x, weights, group_sizes, w_up.shape[-1], capacity, interpret, tiles)
