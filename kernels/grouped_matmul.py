"""Grouped matmuls over rows sorted by expert: the experts step of a MoE block.

Layout: x [N, d] holds the rows of group 0, then group 1, ...; group_sizes int32 [E]; rows past
sum(group_sizes) are padding and come out as exactly 0. Work follows the rows actually routed.

Implementations behind one function (`implementation=`):
  "xla"        the fast path on the CPU: a loop over the *active* experts (dynamic trip count); each expert's
               weights are sliced once, its rows go through in full tiles (dynamic_slice of rows, a
               dynamic_update_slice back), then its remainder in tiles a quarter that size, the last slid
               back to end at the group's end, so skew wastes less than one small tile per expert and a
               decode step computes only its few active experts. No gathers, scatters or padded buffers.
               On a 2-core CPU, d=512 f=1024 E=8 top-2 2048 tokens, it runs at 0.9-1.2x the speed of a dense
               FFN of equal useful FLOPs, balanced or skewed, f32 or bf16, where jax.lax.ragged_dot reaches
               ~0.12 (experiments/results/bench_grouped_matmul_cpu.txt). Not reverse-differentiable
               (dynamic loops): training uses "ragged_dot".
  "pallas"     Pallas kernels in the TPU (Mosaic) layout, kernels/pallas_grouped_matmul.py: a static grid
               over (row tile, group) visits that skips visits with no routed row; "pallas_interpret" runs
               them in interpret mode on any backend (the tests).
  "mosaic_gpu" Pallas Mosaic GPU kernels for Hopper (wgmma, TMA pipelines), kernels/mosaic_gpu_grouped_matmul.py:
               a static grid over (row tile, group) visits x column tiles whose blocks with no routed row return
               at once; the SwiGLU gate and up projections fused in one kernel. bf16/f16 only, widths that
               fill its tiles; "auto" falls back to ragged_dot otherwise. "mosaic_gpu_interpret" runs them in
               GPU interpret mode on the CPU (the tests).
  "ragged_dot" jax.lax.ragged_dot, differentiable; GPUs before Hopper, and shapes the Mosaic kernel does not take.
  "reference"  plain jnp in f32, obviously correct, slow: every row through every expert (a scan),
               each row keeps its own expert's result.
"auto" picks per backend in `default_implementation`. `capacity` (optional) computes only the first
min(count, capacity) rows of each group, the rest come out 0: capacity-aware drop at the kernel level.
"""

from __future__ import annotations

import functools
import time
from typing import Callable

import jax
import jax.numpy as jnp

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "silu": jax.nn.silu,
    "gelu": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_exact": functools.partial(jax.nn.gelu, approximate=False),
    "relu": jax.nn.relu,
}
IMPLEMENTATIONS = ("auto", "xla", "pallas", "pallas_interpret", "mosaic_gpu", "mosaic_gpu_interpret", "ragged_dot",
                   "reference")


def default_implementation() -> str:
    """The one place the backend picks the experts step."""
    backend = jax.default_backend()
    if backend == "gpu" and _is_hopper_or_newer(jax.devices()[0]):
        return "mosaic_gpu"
    return {"cpu": "xla", "tpu": "pallas"}.get(backend, "ragged_dot")


def _is_hopper_or_newer(device) -> bool:
    """Mosaic GPU kernels need compute capability 9.0+ (wgmma, TMA)."""
    try:
        return float(getattr(device, "compute_capability", "0")) >= 9.0
    except ValueError:
        return False


def default_tile(num_rows: int, num_groups: int) -> tuple[int, int]:
    """(tile, remainder_tile) for the xla path. The tile is the largest power of two within the rows an
    expert gets on average, in [8, 512]: large enough to amortise XLA:CPU's few-microsecond loop step and
    keep the dot efficient (256 and 512 measured best at d=512, f=1024, 8 experts, balanced and skewed),
    small enough that a decode step with a row or two per expert does not pay for a large tile. A group's
    last rows go in tiles a quarter that size, so skew wastes less than one small tile per expert."""
    per_group = max(1, -(-num_rows // max(1, num_groups)))
    tile = min(512, max(8, 1 << (per_group.bit_length() - 1)))
    return tile, max(8, tile // 4)


def _check(x, group_sizes, weights: tuple[tuple[str, jax.Array, tuple], ...], activation: str | None):
    if x.ndim != 2:
        raise ValueError(f"x must be [rows, d]; got shape {x.shape}")
    if group_sizes.ndim != 1 or not jnp.issubdtype(group_sizes.dtype, jnp.integer):
        raise ValueError(f"group_sizes must be an int vector [E]; got {group_sizes.dtype}{list(group_sizes.shape)}")
    for name, w, expected in weights:
        if w.shape != expected:
            raise ValueError(f"{name} has shape {w.shape}; expected {expected} for x {x.shape} and "
                             f"{group_sizes.shape[0]} groups")
    if activation is not None and activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; supported: {sorted(ACTIVATIONS)}")


def _implementation(implementation: str, x: jax.Array, weights: tuple[jax.Array, ...]) -> str:
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"unknown implementation {implementation!r}; supported: {IMPLEMENTATIONS}")
    impl = default_implementation() if implementation == "auto" else implementation
    if impl.startswith("mosaic_gpu"):
        from moejax.kernels import mosaic_gpu_grouped_matmul as mosaic

        why_not = mosaic.supported(x, weights, mosaic.DEFAULT_FUSED if len(weights) > 1 else mosaic.DEFAULT)
        if why_not and implementation == "auto":
            return "ragged_dot"
        if why_not:
            raise ValueError(f"implementation {implementation!r} cannot take these inputs: {why_not}")
    return impl


def grouped_ffn(x: jax.Array, group_sizes: jax.Array, w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array, *,
                activation: str = "silu", implementation: str = "auto", tile: int | None = None,
                capacity: int | None = None) -> jax.Array:
    """Per row r of group e: (act(x[r] @ w_gate[e]) * (x[r] @ w_up[e])) @ w_down[e]; padding rows -> 0.

    x [N, d]; group_sizes int [E]; w_gate, w_up [E, d, f]; w_down [E, f, d]. f32 accumulation; output
    dtype = x.dtype. `tile` overrides the xla path's tile (see autotune_tile)."""
    n, d = x.shape if x.ndim == 2 else (0, 0)
    e = group_sizes.shape[0] if group_sizes.ndim == 1 else 0
    f = w_gate.shape[-1]
    _check(x, group_sizes, (("w_gate", w_gate, (e, d, f)), ("w_up", w_up, (e, d, f)),
                            ("w_down", w_down, (e, f, d))), activation)
    act = ACTIVATIONS[activation]
    impl = _implementation(implementation, x, (w_gate, w_up))
    if impl == "reference":
        return grouped_ffn_reference(x, group_sizes, w_gate, w_up, w_down, activation=activation, capacity=capacity)
    if impl.startswith("mosaic_gpu"):
        from moejax.kernels.mosaic_gpu_grouped_matmul import mosaic_grouped_ffn

        out = mosaic_grouped_ffn(x, group_sizes, w_gate, w_up, w_down, activation=activation, capacity=capacity,
                                 interpret=impl == "mosaic_gpu_interpret")
        return _zero_uncomputed_rows(out, group_sizes, capacity)
    if impl.startswith("pallas"):
        from moejax.kernels.pallas_grouped_matmul import pallas_grouped_ffn

        return pallas_grouped_ffn(x, group_sizes, w_gate, w_up, w_down, activation=activation, capacity=capacity,
                                  interpret=impl == "pallas_interpret")
    if impl == "ragged_dot":
        return _within_capacity(_ragged_dot_ffn(x, group_sizes, w_gate, w_up, w_down, act), group_sizes, capacity)

    def expert(rows, weights):
        wg, wu, wd = weights
        h = act(jnp.dot(rows, wg, preferred_element_type=jnp.float32)) * jnp.dot(
            rows, wu, preferred_element_type=jnp.float32)
        return jnp.dot(h.astype(rows.dtype), wd, preferred_element_type=jnp.float32)

    return _tiled(x, group_sizes, (w_gate, w_up, w_down), expert, d, tile, capacity)


def grouped_matmul(x: jax.Array, group_sizes: jax.Array, w: jax.Array, *, implementation: str = "auto",
                   tile: int | None = None, capacity: int | None = None) -> jax.Array:
    """ragged_dot semantics: row r of group e -> x[r] @ w[e]; x [N, d], w [E, d, f] -> [N, f]; padding -> 0."""
    n, d = x.shape if x.ndim == 2 else (0, 0)
    e = group_sizes.shape[0] if group_sizes.ndim == 1 else 0
    _check(x, group_sizes, (("w", w, (e, d, w.shape[-1])),), None)
    impl = _implementation(implementation, x, (w,))
    if impl == "reference":
        return grouped_matmul_reference(x, group_sizes, w, capacity=capacity)
    if impl.startswith("mosaic_gpu"):
        from moejax.kernels.mosaic_gpu_grouped_matmul import mosaic_grouped_matmul

        out = mosaic_grouped_matmul(x, group_sizes, w, capacity=capacity, interpret=impl == "mosaic_gpu_interpret")
        return _zero_uncomputed_rows(out, group_sizes, capacity)
    if impl.startswith("pallas"):
        from moejax.kernels.pallas_grouped_matmul import pallas_grouped_matmul

        return pallas_grouped_matmul(x, group_sizes, w, capacity=capacity, interpret=impl == "pallas_interpret")
    if impl == "ragged_dot":
        valid = jnp.arange(n) < group_sizes.sum()
        out = jax.lax.ragged_dot(x, w, _padding_into_last_group(group_sizes, n), preferred_element_type=jnp.float32)
        return _within_capacity(jnp.where(valid[:, None], out, 0).astype(x.dtype), group_sizes, capacity)
    return _tiled(x, group_sizes, (w,), lambda rows, ws: jnp.dot(rows, ws[0], preferred_element_type=jnp.float32),
                  w.shape[-1], tile, capacity)


def _within_capacity(out: jax.Array, group_sizes: jax.Array, capacity: int | None) -> jax.Array:
    """Zero the rows past each group's first `capacity` (for paths that compute them anyway)."""
    if capacity is None:
        return out
    return jnp.where((_rank_in_group(group_sizes, out.shape[0]) < capacity)[:, None], out, 0)


def _zero_uncomputed_rows(out: jax.Array, group_sizes: jax.Array, capacity: int | None) -> jax.Array:
    """0 for the rows the Mosaic GPU kernels leave unwritten: padding and rows past a group's capacity."""
    computed = _reference_groups(group_sizes, out.shape[0], capacity) < group_sizes.shape[0]
    return jnp.where(computed[:, None], out, 0)


def _rank_in_group(group_sizes: jax.Array, n: int) -> jax.Array:
    """int [N]: each row's position inside its group."""
    group = _group_of_rows(group_sizes, n)
    starts = jnp.concatenate([jnp.zeros((1,), group_sizes.dtype), jnp.cumsum(group_sizes)])
    return jnp.arange(n) - starts[jnp.minimum(group, group_sizes.shape[0])]


def _tiled(x, group_sizes, weights, compute, out_dim: int, tile: int | None, capacity: int | None) -> jax.Array:
    """Loop over the active experts (dynamic trip count); per expert, slice its weights once, run its rows
    through in full tiles, then its remainder in smaller tiles. No gathers or scatter-adds: each tile is a
    dynamic_slice of rows and a dynamic_update_slice whose rows outside the group keep their values."""
    n = x.shape[0]
    if n == 0:
        return jnp.zeros((0, out_dim), x.dtype)
    num_groups = group_sizes.shape[0]
    group_sizes = group_sizes.astype(jnp.int32)
    tile, small = default_tile(n, num_groups) if tile is None else (tile, max(8, tile // 4))
    tile = min(tile, n)  # a tile never holds more rows than there are
    small = min(small, tile)
    starts = jnp.cumsum(group_sizes) - group_sizes
    if capacity is not None:  # rows keep their places; only the first `capacity` of each group are computed
        group_sizes = jnp.minimum(group_sizes, capacity)
    active = jnp.nonzero(group_sizes > 0, size=min(num_groups, n), fill_value=0)[0]
    x_bits = _bits(x)
    weights_bits = tuple((_bits(w), w.dtype) for w in weights)

    def one_tile(out, row0, lo, hi, size, expert_weights):
        # Rows [row0, row0 + size), slid back to stay inside x; only rows in [lo, hi) are written.
        start = jnp.clip(row0, 0, n - size)
        y = compute(_unbits(jax.lax.dynamic_slice_in_dim(x_bits, start, size, 0), x.dtype), expert_weights)
        index = start + jnp.arange(size)
        mine = ((index >= lo) & (index < hi))[:, None]
        old = jax.lax.dynamic_slice_in_dim(out, start, size, 0)
        return jax.lax.dynamic_update_slice_in_dim(out, jnp.where(mine, y, old), start, 0)

    def expert_body(i, out):
        e = active[i]
        start, end = starts[e], starts[e] + group_sizes[e]
        expert_weights = tuple(_unbits(w[e], dtype) for w, dtype in weights_bits)  # one copy per expert
        full = group_sizes[e] // tile
        out = jax.lax.fori_loop(0, full, lambda j, o: one_tile(o, start + j * tile, start, end, tile,
                                                              expert_weights), out)
        # The remainder (< tile rows) in small tiles; the last ends at the group's end, overlapping the
        # one before it rather than computing rows past it.
        rest = start + full * tile
        return jax.lax.fori_loop(0, (end - rest + small - 1) // small, lambda j, o: one_tile(
            o, jnp.minimum(rest + j * small, end - small), rest, end, small, expert_weights), out)

    # f32 output buffer, cast once at the end: XLA:CPU widens bf16 elementwise ops to f32, and the update
    # of a bf16 buffer then copies the whole buffer on every tile instead of writing the tile in place.
    out = jnp.zeros((n, out_dim), jnp.float32)
    return jax.lax.fori_loop(0, jnp.sum(group_sizes > 0), expert_body, out).astype(x.dtype)


def _bits(a: jax.Array) -> jax.Array:
    """2-byte floats as uint16 for dynamic slicing: XLA:CPU widens a bf16 dynamic-slice to f32 and hoists the
    widening out of the loop, converting every expert's weights on every call (all 64 experts for a decode
    step that uses 4). Slicing the raw bits is a plain copy of the rows or the expert taken."""
    return jax.lax.bitcast_convert_type(a, jnp.uint16) if a.dtype.itemsize == 2 else a


def _unbits(a: jax.Array, dtype) -> jax.Array:
    return jax.lax.bitcast_convert_type(a, dtype) if a.dtype != dtype else a


def _padding_into_last_group(group_sizes: jax.Array, n: int) -> jax.Array:
    """ragged_dot needs sizes that sum to N: the padding rows join the last group (and are zeroed after)."""
    return group_sizes.astype(jnp.int32).at[-1].add(n - group_sizes.sum().astype(jnp.int32))


def _ragged_dot_ffn(x, group_sizes, w_gate, w_up, w_down, act):
    n = x.shape[0]
    sizes = _padding_into_last_group(group_sizes, n)
    dot = functools.partial(jax.lax.ragged_dot, group_sizes=sizes, preferred_element_type=jnp.float32)
    h = act(dot(x, w_gate)) * dot(x, w_up)
    out = dot(h.astype(x.dtype), w_down)
    valid = jnp.arange(n) < group_sizes.sum()
    return jnp.where(valid[:, None], out, 0).astype(x.dtype)


def _group_of_rows(group_sizes: jax.Array, n: int) -> jax.Array:
    """int [N]: each row's group; E for padding rows."""
    return jnp.searchsorted(jnp.cumsum(group_sizes), jnp.arange(n), side="right")


def grouped_ffn_reference(x, group_sizes, w_gate, w_up, w_down, *, activation: str = "silu",
                          capacity: int | None = None) -> jax.Array:
    """Plain jnp in f32: every row through every expert, each row keeps its own expert's result (rows of
    no group, i.e. padding or past a capacity, keep 0). Slow, obviously correct."""
    act = ACTIVATIONS[activation]
    xf = x.astype(jnp.float32)

    def expert(out, e_weights):
        e, wg, wu, wd = e_weights
        y = (act(xf @ wg) * (xf @ wu)) @ wd
        return jnp.where((group == e)[:, None], y, out), None

    group = _reference_groups(group_sizes, x.shape[0], capacity)
    weights = tuple(w.astype(jnp.float32) for w in (w_gate, w_up, w_down))
    out, _ = jax.lax.scan(expert, jnp.zeros(x.shape, jnp.float32), (jnp.arange(group_sizes.shape[0]), *weights))
    return out.astype(x.dtype)


def grouped_matmul_reference(x, group_sizes, w, *, capacity: int | None = None) -> jax.Array:
    """Plain jnp in f32, as grouped_ffn_reference: row r of group e -> x[r] @ w[e]; other rows -> 0."""
    group = _reference_groups(group_sizes, x.shape[0], capacity)
    y = jnp.einsum("nd,edf->nef", x.astype(jnp.float32), w.astype(jnp.float32))
    mine = group[:, None] == jnp.arange(group_sizes.shape[0])
    return jnp.where(mine[:, :, None], y, 0).sum(axis=1).astype(x.dtype)


def _reference_groups(group_sizes: jax.Array, n: int, capacity: int | None) -> jax.Array:
    """int [N]: each row's group; E (no group) for padding rows and rows past a group's capacity."""
    group = _group_of_rows(group_sizes, n)
    if capacity is not None:
        group = jnp.where(_rank_in_group(group_sizes, n) < capacity, group, group_sizes.shape[0])
    return group


def autotune_tile(x, group_sizes, w_gate, w_up, w_down, *, candidates=(64, 128, 256, 512), repeats: int = 3,
                  activation: str = "silu") -> int:
    """The xla path's fastest tile for these shapes and this routing, timed here (for benchmarks and for
    users who run one shape many times; the library default is default_tile)."""
    best, best_time = None, float("inf")
    for tile in candidates:
        fn = jax.jit(functools.partial(grouped_ffn, activation=activation, implementation="xla", tile=tile))
        jax.block_until_ready(fn(x, group_sizes, w_gate, w_up, w_down))
        start = time.perf_counter()
        for _ in range(repeats):
            jax.block_until_ready(fn(x, group_sizes, w_gate, w_up, w_down))
        elapsed = time.perf_counter() - start
        if elapsed < best_time:
            best, best_time = tile, elapsed
    return best
