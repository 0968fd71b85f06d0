"""Pallas grouped matmuls (TPU Mosaic layout; interpret mode on the CPU for tests).

Rows are sorted by group (the layout of kernels/grouped_matmul.py). The grid is static: for each output
column tile it walks "visits" (row tile, group) in row order; there are at most ceil(N / tm) + E + 1 of them. Per group only
the first min(count, capacity) rows are computed (capacity-aware drop at the kernel level); a visit with
no such row skips its matmul, so the work follows the rows actually routed, never more than the capacity.
Every row tile is visited at least once, so rows that no group computes (padding, rows past a capacity)
come out as 0.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from moejax.kernels.grouped_matmul import ACTIVATIONS


def tile_sizes(n: int, d: int, f: int) -> tuple[int, int, int]:
    """(tm, tk, tn): rows, reduction and output tiles. 128-multiples where the dimension allows (the TPU's
    MXU and lane width), else the whole dimension; row tiles shrink for small inputs."""
    def pick(dim, preferred):
        for t in (preferred, 256, 128):
            if t <= dim and dim % t == 0:
                return t
        return dim
    tm = min(128, max(8, 1 << max(0, n - 1).bit_length()))
    return tm, pick(d, 512), pick(f, 512)


def visit_metadata(group_sizes: jax.Array, num_rows: int, tm: int, capacity: int | None):
    """Static-size visit lists for the grid: group id, row tile, and each group's computed row range."""
    num_groups = group_sizes.shape[0]
    sizes = group_sizes.astype(jnp.int32)
    starts = jnp.cumsum(sizes) - sizes
    ends = starts + sizes
    # group `num_groups` stands for the rows after the last group (padding): visited, never computed
    range_starts = jnp.concatenate([starts, ends[-1:]])
    range_ends = jnp.concatenate([ends, jnp.full((1,), num_rows, jnp.int32)])
    kept = sizes if capacity is None else jnp.minimum(sizes, capacity)
    compute_ends = jnp.concatenate([starts + kept, ends[-1:]])
    first_tile = range_starts // tm
    last_tile = jnp.maximum(range_ends - 1, range_starts) // tm
    tiles = jnp.where(range_ends > range_starts, last_tile - first_tile + 1, 0)
    max_visits = -(-num_rows // tm) + num_groups + 1
    group_ids = jnp.repeat(jnp.arange(num_groups + 1, dtype=jnp.int32), tiles, total_repeat_length=max_visits)
    visit_start = jnp.cumsum(tiles) - tiles
    row_tiles = first_tile[group_ids] + jnp.arange(max_visits, dtype=jnp.int32) - visit_start[group_ids]
    num_visits = tiles.sum()
    # visits past the real ones repeat the last: same blocks (no new copies), no compute, no new write
    last = jnp.maximum(num_visits - 1, 0)
    valid = jnp.arange(max_visits) < num_visits
    group_ids = jnp.where(valid, group_ids, group_ids[last])
    row_tiles = jnp.where(valid, row_tiles, row_tiles[last]).astype(jnp.int32)
    return (group_ids, row_tiles, range_starts.astype(jnp.int32), compute_ends.astype(jnp.int32),
            num_visits.reshape(1).astype(jnp.int32)), max_visits


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


def _gmm_kernel(group_ids, row_tiles, starts, compute_ends, num_visits, x_ref, w_ref, o_ref, acc_ref, *, tm):
    meta = (group_ids, row_tiles, starts, compute_ends, num_visits)
    mine, busy, first_visit = _rows_to_write(meta, tm)
    k = pl.program_id(2)

    @pl.when(k == 0)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when(busy)
    def _():
        acc_ref[...] += jnp.dot(x_ref[...], w_ref[0], preferred_element_type=jnp.float32)

    @pl.when(k == pl.num_programs(2) - 1)
    def _():
        # consecutive visits of one row tile share the output block: merge this group's rows into it
        previous = jnp.where(first_visit, jnp.zeros_like(acc_ref), o_ref[...].astype(jnp.float32))
        o_ref[...] = jnp.where(mine, acc_ref[...], previous).astype(o_ref.dtype)


def _swiglu_kernel(group_ids, row_tiles, starts, compute_ends, num_visits, x_ref, wg_ref, wu_ref, o_ref, gate_ref,
                   up_ref, *, tm, activation):
    meta = (group_ids, row_tiles, starts, compute_ends, num_visits)
    mine, busy, first_visit = _rows_to_write(meta, tm)
    k = pl.program_id(2)

    @pl.when(k == 0)
    def _():
        gate_ref[...] = jnp.zeros_like(gate_ref)
        up_ref[...] = jnp.zeros_like(up_ref)

    @pl.when(busy)
    def _():
        x = x_ref[...]
        gate_ref[...] += jnp.dot(x, wg_ref[0], preferred_element_type=jnp.float32)
        up_ref[...] += jnp.dot(x, wu_ref[0], preferred_element_type=jnp.float32)

    @pl.when(k == pl.num_programs(2) - 1)
    def _():
        h = ACTIVATIONS[activation](gate_ref[...]) * up_ref[...]
        previous = jnp.where(first_visit, jnp.zeros_like(h), o_ref[...].astype(jnp.float32))
        o_ref[...] = jnp.where(mine, h, previous).astype(o_ref.dtype)


def _call(kernel, x, weights, group_sizes, out_dim, capacity, interpret, scratch_count, tiles):
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
        scratch_shapes=[pltpu.VMEM((tm, tn), jnp.float32)] * scratch_count)
    out = pl.pallas_call(functools.partial(kernel, tm=tm), grid_spec=spec,
                         out_shape=jax.ShapeDtypeStruct((padded_rows, out_dim), x.dtype),
                         compiler_params=pltpu.CompilerParams(
                             dimension_semantics=("parallel", "arbitrary", "arbitrary")),
                         interpret=interpret)(*meta, x_padded, *weights)
    return out[:n]


def pallas_grouped_matmul(x, group_sizes, w, *, capacity: int | None = None, interpret: bool = False, tiles=None):
    """x [N, d] rows sorted by group, w [E, d, f] -> [N, f]; each group computes its first min(count,
    capacity) rows; other rows -> 0."""
    return _call(_gmm_kernel, x, (w,), group_sizes, w.shape[-1], capacity, interpret, 1, tiles)


def pallas_grouped_swiglu(x, group_sizes, w_gate, w_up, *, activation: str = "silu", capacity: int | None = None,
                          interpret: bool = False, tiles=None):
    """The fused gate/up pass: act(x @ w_gate[e]) * (x @ w_up[e]) in one kernel -> [N, f]."""
    kernel = functools.partial(_swiglu_kernel, activation=activation)
    return _call(kernel, x, (w_gate, w_up), group_sizes, w_gate.shape[-1], capacity, interpret, 2, tiles)


def pallas_grouped_ffn(x, group_sizes, w_gate, w_up, w_down, *, activation: str = "silu",
                       capacity: int | None = None, interpret: bool = False) -> jax.Array:
    """The expert FFN: the fused gate/up kernel, then the down projection kernel."""
    h = pallas_grouped_swiglu(x, group_sizes, w_gate, w_up, activation=activation, capacity=capacity,
                              interpret=interpret)
    return pallas_grouped_matmul(h, group_sizes, w_down, capacity=capacity, interpret=interpret)
