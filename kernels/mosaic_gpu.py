"""Pallas Mosaic GPU grouped matmuls for Hopper (wgmma + TMA pipelines); GPU interpret mode on the CPU for tests.

The CUDA grid is static: one block per (visit, output column tile), the visits of kernels/visits.py. A block
whose visit has no row to compute (a group's rows past its capacity, a visit past the real ones) returns at
once, so the work follows the rows actually routed and never exceeds the capacity. A block that computes
loads the x row tile and the group's weight column tiles through a TMA pipeline over the reduction
dimension into wgmma accumulators, then stores only its group's rows of the tile: a row tile shared by two
groups is written by two blocks, each its own rows, with TMA stores of power-of-two row counts (a static
ladder, since a TMA copy has a static shape).

The fused SwiGLU variant keeps two accumulators (gate and up) fed from one x tile and applies the
activation in registers before the store. The kernels leave rows that no group computes unwritten;
MosaicGpu zeroes them in one pass over the final output.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, ClassVar

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from moejax.kernels.base import ExpertWeights, InterpretableKernels, expert_hidden, has_bias, zero_uncomputed_rows
from moejax.kernels.visits import visit_row_ranges


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


@dataclasses.dataclass(frozen=True)
class MosaicGpuConfig:
    """gate_up: the FFN's fused gate/up kernel; matmul: the plain grouped matmul and the FFN's down
    projection. Two f32 accumulators of 128 x 128 would need all of a warpgroup's registers: the fused
    kernel halves n. Both FFN kernels share one visit list, so they share block_m."""
    gate_up: TileConfig = TileConfig(block_n=64)
    matmul: TileConfig = TileConfig()

    def __post_init__(self):
        if self.gate_up.block_m != self.matmul.block_m:
            raise ValueError(f"the two kernels share visits: block_m {self.gate_up.block_m} != {self.matmul.block_m}")


@dataclasses.dataclass(frozen=True)
class MosaicGpu(InterpretableKernels):
    """The Hopper kernels; interpret=True runs them in GPU interpret mode (simulated SMEM, TMA, wgmma)."""
    base_name: ClassVar[str] = "mosaic_gpu"
    config: MosaicGpuConfig = MosaicGpuConfig()

    def supported(self, x, weights, *, capacity):
        del capacity
        ffn = isinstance(weights, ExpertWeights)
        if ffn and has_bias(weights):
            return "the Mosaic GPU kernels take no expert biases"
        if x.dtype not in (jnp.bfloat16, jnp.float16):
            return f"wgmma operands here are bf16/f16; got {x.dtype}"
        if any(w.dtype != x.dtype for w in jax.tree.leaves(weights)):
            return f"weights must have x's dtype {x.dtype}; got {[str(w.dtype) for w in jax.tree.leaves(weights)]}"
        config = self.config.gate_up if ffn else self.config.matmul
        d, f = (weights.up if ffn else weights[0]).shape[1:]
        if d % config.block_k(x.dtype):
            return f"reduction dimension {d} is not a multiple of {config.block_k(x.dtype)}"
        if f % 64:
            return f"output dimension {f} is not a multiple of 64"
        if not self.interpret and not is_hopper_or_newer():
            return (f"the kernels need a GPU of compute capability 9.0+ (wgmma, TMA); the backend is "
                    f"{jax.default_backend()} (\"mosaic_gpu_interpret\" runs them in interpret mode)")
        return None

    def _ffn(self, x, group_sizes, weights, *, activation, capacity):
        if not isinstance(activation, str):  # a ClampedSwiGLU's clamps are untested in the register epilogue
            raise NotImplementedError(f"the Mosaic GPU kernels take a named activation only; got {activation!r}")
        n, x = x.shape[0], _rows_to_multiple_of_8(x)
        visits = visit_row_ranges(group_sizes, x.shape[0], self.config.gate_up.block_m, capacity)
        # both kernels compute the same rows, so the rows h leaves unwritten are never read as computed
        if weights.gated:
            h = _grouped_call(x, visits, (weights.gate, weights.up), lambda g, u: expert_hidden(activation, g, u),
                              self.config.gate_up, self.interpret)
        else:
            h = _grouped_call(x, visits, (weights.up,), lambda u: expert_hidden(activation, None, u),
                              self.config.gate_up, self.interpret)
        out = _grouped_call(h, visits, (weights.down,), lambda acc: acc, self.config.matmul, self.interpret)[:n]
        return zero_uncomputed_rows(out, group_sizes, capacity)

    def _matmul(self, x, group_sizes, w, *, capacity):
        n, x = x.shape[0], _rows_to_multiple_of_8(x)
        visits = visit_row_ranges(group_sizes, x.shape[0], self.config.matmul.block_m, capacity)
        out = _grouped_call(x, visits, (w,), lambda acc: acc, self.config.matmul, self.interpret)[:n]
        return zero_uncomputed_rows(out, group_sizes, capacity)


def is_hopper_or_newer() -> bool:
    """Mosaic GPU kernels need compute capability 9.0+ (wgmma, TMA)."""
    if jax.default_backend() != "gpu":
        return False
    try:
        return float(getattr(jax.devices()[0], "compute_capability", "0")) >= 9.0
    except ValueError:
        return False


def _block_n(f: int, config: TileConfig) -> int:
    """config.block_n where it divides the output width, else 64 (supported() checked that 64 does)."""
    return config.block_n if f % config.block_n == 0 else 64


def _rows_to_multiple_of_8(x: jax.Array) -> jax.Array:
    """TMA descriptors tile the rows by 8: pad the rare N that is not a multiple (the padding is never computed)."""
    return x if x.shape[0] % 8 == 0 else jnp.pad(x, ((0, -x.shape[0] % 8), (0, 0)))


def _grouped_call(x, visits, weights: tuple[jax.Array, ...], epilogue: Callable, config: TileConfig,
                  interpret: bool) -> jax.Array:
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


def _interpret_params():
    """GPU interpret mode (simulated SMEM, TMA and wgmma on the CPU), for the tests. The last row tile may
    reach past the rows: TMA fills such reads on the GPU, the interpreter with NaN, which shows whether any
    row outside a visit's range is ever stored. Unwritten output memory is NaN too."""
    # The one private JAX import in kernels/: jax 0.10.2 exports no public name for the GPU interpreter's
    # parameters, and only an InterpretGPUParams selects that interpreter (interpret=True selects the
    # generic one, which does not simulate SMEM, TMA or wgmma; jax.experimental.pallas.tpu.InterpretParams
    # selects the TPU one).
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

    return InterpretGPUParams(out_of_bounds_reads="uninitialized", uninitialized_memory="nan")
