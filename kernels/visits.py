"""The static grid of the Pallas kernels (TPU and Mosaic GPU): "visits" (row tile, group) in row order.

Rows are sorted by group, so a row tile meets one group or a few; each (row tile, group) pair that shares
rows is one visit, at most ceil(N / tm) + E + 1 of them: a static bound, since interpret mode and the grids
need static sizes. Group E stands for the padding rows after the last group, so every row tile is visited
at least once (the kernels write its rows as 0). Visits past the real ones repeat the last real one: the
same blocks, so they cost no new copies, and they compute and write nothing.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def visit_metadata(group_sizes: jax.Array, num_rows: int, tm: int, capacity: int | None):
    """((group ids [V], row tiles [V], group row starts [E + 1], computed row ends [E + 1], visit count [1]),
    V). Group g's rows are [starts[g], starts[g] + count); it computes [starts[g], compute_ends[g])."""
    num_groups = group_sizes.shape[0]
    sizes = group_sizes.astype(jnp.int32)
    starts = jnp.cumsum(sizes) - sizes
    ends = starts + sizes
    range_starts = jnp.concatenate([starts, ends[-1:]])
    range_ends = jnp.concatenate([ends, jnp.full((1,), num_rows, jnp.int32)])
    kept = sizes if capacity is None else jnp.minimum(sizes, capacity)
    compute_ends = jnp.concatenate([starts + kept, ends[-1:]])  # the padding pseudo-group computes nothing
    first_tile = range_starts // tm
    last_tile = jnp.maximum(range_ends - 1, range_starts) // tm
    tiles = jnp.where(range_ends > range_starts, last_tile - first_tile + 1, 0)
    max_visits = -(-num_rows // tm) + num_groups + 1
    group_ids = jnp.repeat(jnp.arange(num_groups + 1, dtype=jnp.int32), tiles, total_repeat_length=max_visits)
    visit_start = jnp.cumsum(tiles) - tiles
    row_tiles = first_tile[group_ids] + jnp.arange(max_visits, dtype=jnp.int32) - visit_start[group_ids]
    num_visits = tiles.sum()
    last = jnp.maximum(num_visits - 1, 0)
    valid = jnp.arange(max_visits) < num_visits
    group_ids = jnp.where(valid, group_ids, group_ids[last])
    row_tiles = jnp.where(valid, row_tiles, row_tiles[last]).astype(jnp.int32)
    return (group_ids, row_tiles, range_starts.astype(jnp.int32), compute_ends.astype(jnp.int32),
            num_visits.reshape(1).astype(jnp.int32)), max_visits


def visit_row_ranges(group_sizes: jax.Array, num_rows: int, tm: int, capacity: int | None):
    """Per visit: (group [V] in [0, E), row tile [V], rows [lo, hi) it computes, empty for visits with nothing
    to do), V. For kernels that store only their rows and skip empty visits, leaving other rows unwritten."""
    (groups, row_tiles, range_starts, compute_ends, num_visits), max_visits = visit_metadata(
        group_sizes, num_rows, tm, capacity)
    lo = jnp.maximum(range_starts[groups], row_tiles * tm)
    hi = jnp.minimum(compute_ends[groups], row_tiles * tm + tm)
    real = jnp.arange(max_visits) < num_visits[0]
    hi = jnp.where(real & (groups < group_sizes.shape[0]), hi, lo)
    groups = jnp.minimum(groups, group_sizes.shape[0] - 1)  # the padding pseudo-group computes nothing
    return groups, row_tiles, lo, jnp.maximum(hi, lo), max_visits
