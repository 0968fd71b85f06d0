"""Pallas Mosaic GPU grouped matmuls for Hopper (wgmma + TMA pipelines); interpret mode on the CPU for tests.

Rows are sorted by group (the layout of kernels/grouped_matmul.py). The CUDA grid is static: one block per
(visit, output column tile), where a visit is a (row tile, group) pair with at most ceil(N / tm) + E of them
(kernels/pallas_grouped_matmul.visit_metadata, shared with the TPU kernel). A block whose visit has no row
to compute (a group's rows past its capacity, a visit past the real ones) returns at once, so the work
follows the rows actually routed and never exceeds the capacity. A block that computes loads the x row tile
and the group's weight column tiles through a TMA pipeline over the reduction dimension into wgmma
accumulators, then stores only its group's rows of the tile: a row tile shared by two groups is written by
two blocks, each its own rows, with TMA stores of power-of-two row counts (a static ladder, since a TMA
copy has a static shape).

The fused SwiGLU variant keeps two accumulators (gate and up) fed from one x tile and applies the
activation in registers before the store. Rows that no group computes are left unwritten here; the
caller (grouped_matmul.grouped_ffn) zeroes them in one pass over the final [N, d] output.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp

from moejax.kernels.grouped_matmul import ACTIVATIONS
from moejax.kernels.pallas_grouped_matmul import visit_metadata


@dataclasses.dataclass(frozen=True)
class TileConfig:
    """block_m rows x block_n output columns per block; block_k reduction per pipeline step (128 bytes of a
    row, the TMA swizzle width); max_concurrent_steps TMA stages in flight; grid_block_n: column tiles per
    band of the block order (blocks that run together share weight tiles in L2)."""
    block_m: int = 128
    block_n: int = 128
    max_concurrent_steps: int = 4
    grid_block_n: int = 8

    def block_k(self, dtype) -> int:
        return 128 // jnp.dtype(dtype).itemsize


# Two f32 accumulators of 128 x 128 would need all of a warpgroup's registers: the fused kernel halves n.
DEFAULT = TileConfig()
DEFAULT_FUSED = TileConfig(block_n=64)


def supported(x: jax.Array, weights: tuple[jax.Array, ...], config: TileConfig) -> str | None:
    """None when the kernel takes these shapes, else why not (the caller then uses another path)."""
    if x.dtype not in (jnp.bfloat16, jnp.float16):
        return f"wgmma operands here are bf16/f16; got {x.dtype}"
    if any(w.dtype != x.dtype for w in weights):
        return f"weights must have x's dtype {x.dtype}; got {[str(w.dtype) for w in weights]}"
    d, f = weights[0].shape[1:]
    if d % config.block_k(x.dtype):
        return f"reduction dimension {d} is not a multiple of {config.block_k(x.dtype)}"
    if f % 64:
        return f"output dimension {f} is not a multiple of 64"
    return None


def _block_n(f: int, config: TileConfig) -> int:
    """config.block_n where it divides the output width, else 64 (supported() checked that 64 does)."""
    return config.block_n if f % config.block_n == 0 else 64


def _visits(group_sizes: jax.Array, n: int, tm: int, capacity: int | None):
    """Per visit: group, row tile, and the rows [lo, hi) it computes (empty for visits with nothing to do)."""
    (groups, row_tiles, range_starts, compute_ends, num_visits), max_visits = visit_metadata(
        group_sizes, n, tm, capacity)
    lo = jnp.maximum(range_starts[groups], row_tiles * tm)
    hi = jnp.minimum(compute_ends[groups], row_tiles * tm + tm)
    real = jnp.arange(max_visits) < num_visits[0]
    hi = jnp.where(real & (groups < group_sizes.shape[0]), hi, lo)
    groups = jnp.minimum(groups, group_sizes.shape[0] - 1)  # the padding pseudo-group computes nothing
    return groups, row_tiles, lo, jnp.maximum(hi, lo), max_visits


def _grouped_call(x, visits, weights: tuple[jax.Array, ...], epilogue: Callable, config: TileConfig,
                  interpret: bool) -> jax.Array:
    from jax import lax
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    groups, row_tiles, lo, hi, max_visits = visits
    n, d = x.shape
    f = weights[0].shape[-1]
    bm, bn, bk = config.block_m, _block_n(f, config), config.block_k(x.dtype)
    grid_n = f // bn
    out_dtype = x.dtype

    def body(groups_ref, tiles_ref, lo_ref, hi_ref, x_gmem, *refs):
        w_gmems, o_gmem = refs[:-1], refs[-1]
        visit, col = plgpu.planar_snake(lax.axis_index("block"), (max_visits, grid_n), 1,
                                        min(config.grid_block_n, grid_n))
        group, row_tile = groups_ref[visit], tiles_ref[visit]
        row_lo, row_hi = lo_ref[visit], hi_ref[visit]

        @pl.when(row_hi > row_lo)
        def _compute():
            def accumulate(*acc_refs):
                def step(_, x_smem, *w_smems):
                    for acc_ref, w_smem in zip(acc_refs, w_smems):
                        plgpu.wgmma(acc_ref, x_smem, w_smem)

                plgpu.emit_pipeline(
                    step, grid=(d // bk,),
                    in_specs=[plgpu.BlockSpec((bm, bk), lambda k: (row_tile, k), delay_release=1)]
                    + [plgpu.BlockSpec((bk, bn), lambda k: (k, col), delay_release=1) for _ in weights],
                    max_concurrent_steps=config.max_concurrent_steps,
                )(x_gmem, *(w.at[group] for w in w_gmems))
                return tuple(acc_ref[...] for acc_ref in acc_refs)

            accs = pl.run_scoped(accumulate, *(plgpu.ACC((bm, bn)) for _ in weights))

            def store(o_smem):
                o_smem[...] = epilogue(*accs).astype(out_dtype)
                plgpu.commit_smem()
                # Rows [row_lo, row_hi) of this tile, as TMA stores of 2^i rows for the set bits of the count.
                count, offset = row_hi - row_lo, row_lo - row_tile * bm
                rows = 1 << (min(bm, n).bit_length() - 1)
                while rows:
                    @pl.when(count & rows != 0)
                    def _store(rows=rows, offset=offset):
                        plgpu.copy_smem_to_gmem(o_smem.at[pl.ds(offset, rows)],
                                                o_gmem.at[pl.ds(row_tile * bm + offset, rows), pl.ds(col * bn, bn)])

                    offset = offset + (count & rows)
                    rows //= 2
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)

            pl.run_scoped(store, plgpu.SMEM((bm, bn), out_dtype))

    kernel = plgpu.kernel(body, out_type=jax.ShapeDtypeStruct((n, f), out_dtype), grid=(max_visits * grid_n,),
                          grid_names=("block",), interpret=_interpret_params() if interpret else None)
    return kernel(groups, row_tiles, lo, hi, x, *weights)


def mosaic_grouped_matmul(x, group_sizes, w, *, capacity: int | None = None, config: TileConfig = DEFAULT,
                          interpret: bool = False) -> jax.Array:
    """x [N, d] rows sorted by group, w [E, d, f] -> [N, f]; rows no group computes are left unwritten."""
    n, x = x.shape[0], _rows_to_multiple_of_8(x)
    visits = _visits(group_sizes, x.shape[0], config.block_m, capacity)
    return _grouped_call(x, visits, (w,), lambda acc: acc, config, interpret)[:n]


def _rows_to_multiple_of_8(x: jax.Array) -> jax.Array:
    """TMA descriptors tile the rows by 8: pad the rare N that is not a multiple (the padding is never computed)."""
    return x if x.shape[0] % 8 == 0 else jnp.pad(x, ((0, -x.shape[0] % 8), (0, 0)))


def mosaic_grouped_ffn(x, group_sizes, w_gate, w_up, w_down, *, activation: str = "silu",
                       capacity: int | None = None, config: TileConfig = DEFAULT_FUSED,
                       down_config: TileConfig = DEFAULT, interpret: bool = False) -> jax.Array:
    """SwiGLU experts: the fused gate/up kernel, then the down projection; rows no group computes are left
    unwritten (both kernels compute the same rows)."""
    act = ACTIVATIONS[activation]
    if config.block_m != down_config.block_m:
        raise ValueError(f"the two kernels share visits: block_m {config.block_m} != {down_config.block_m}")
    n, x = x.shape[0], _rows_to_multiple_of_8(x)
    visits = _visits(group_sizes, x.shape[0], config.block_m, capacity)
    h = _grouped_call(x, visits, (w_gate, w_up), lambda gate, up: act(gate) * up, config, interpret)
    return _grouped_call(h, visits, (w_down,), lambda acc: acc, down_config, interpret)[:n]


def _interpret_params():
    """GPU interpret mode (simulated SMEM, TMA and wgmma on the CPU), for the tests. The last row tile may
    reach past the rows: TMA fills such reads on the GPU, the interpreter with NaN, which shows whether any
    row outside a visit's range is ever stored. Unwritten output memory is NaN too."""
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

    return InterpretGPUParams(out_of_bounds_reads="uninitialized", uninitialized_memory="nan")
