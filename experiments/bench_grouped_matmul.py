"""Grouped matmul throughput: moejax's kernels against jax.lax.ragged_dot (and tokamax where installed),
each as a ratio to a dense matmul doing the same useful FLOPs, measured side by side in one run.

For each shape and routing skew: x [N, d] rows sorted by expert times w [E, d, f] (ragged_dot semantics),
achieved GFLOP/s (useful FLOPs 2*N*d*f) and efficiency = dense time / implementation time.

  python experiments/bench_grouped_matmul.py --shapes=small,mixtral --json_out=experiments/results/...json
"""

from __future__ import annotations

import functools
import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from moejax import kernels

# name -> (rows N, d, f, experts). mixtral: Mixtral-8x7B's expert shapes, top-2 over 8192 tokens.
SHAPES = {"small": (4096, 512, 1024, 8), "many-experts": (4096, 512, 256, 64), "mixtral": (16384, 4096, 14336, 8)}

_SHAPES = flags.DEFINE_list("shapes", ["small", "many-experts"], f"Shapes from {sorted(SHAPES)}.")
_ROWS = flags.DEFINE_integer("rows", 0, "Override N for every shape (e.g. fewer rows at Mixtral shapes on a CPU).")
_SKEWS = flags.DEFINE_list("skews", ["balanced", "hot3x", "zipf"], "Routing skews.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Input dtype (f32 accumulation).")
_IMPLS = flags.DEFINE_list("implementations", ["auto", "ragged_dot"],
                           "moejax implementations (auto = the backend's default); tokamax is added if installed.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed repeats after warm-up (median reported).")
_JSON_OUT = flags.DEFINE_string("json_out", "", "Also write the results here.")


def group_sizes(skew: str, rows: int, experts: int) -> np.ndarray:
    if skew == "balanced":
        share = np.full(experts, 1.0)
    elif skew == "hot3x":  # one expert gets 3x its share
        share = np.full(experts, (experts - 3.0) / (experts - 1))
        share[0] = 3.0
    elif skew == "zipf":
        share = 1.0 / np.arange(1, experts + 1)
    else:
        raise ValueError(f"unknown skew {skew!r}; supported: balanced, hot3x, zipf")
    sizes = np.floor(share / share.sum() * rows).astype(np.int32)
    sizes[0] += rows - sizes.sum()
    return sizes


def timed(fn, repeats: int) -> float:
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def implementations() -> dict:
    impls = {name: jax.jit(functools.partial(kernels.grouped_matmul, implementation=name)) for name in _IMPLS.value}
    try:
        import tokamax  # optional: only where installed

        impls["tokamax"] = jax.jit(lambda x, g, w: tokamax.ragged_dot(x, w, g))
    except ImportError:
        pass
    return impls


def main(argv):
    del argv
    dtype = jnp.dtype(_DTYPE.value)
    machine = {"backend": jax.default_backend(), "device": str(jax.devices()[0].device_kind), "jax": jax.__version__,
               "cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
               "auto": kernels.default_implementation()}
    print(f"machine: {machine}")
    results = []
    impls = implementations()
    for shape in _SHAPES.value:
        n, d, f, e = SHAPES[shape]
        n = _ROWS.value or n
        rng = np.random.default_rng(0)
        x = jnp.asarray(rng.normal(size=(n, d)), dtype)
        w = jnp.asarray(rng.normal(size=(e, d, f)) * 0.02, dtype)
        dense = jax.jit(lambda x, w0: jnp.dot(x, w0, preferred_element_type=jnp.float32).astype(x.dtype))
        dense_s = timed(lambda: dense(x, w[0]), _REPEATS.value)
        flops = 2.0 * n * d * f
        print(f"\n{shape}: N={n} d={d} f={f} E={e} {_DTYPE.value}; dense {dense_s * 1e3:.1f} ms "
              f"({flops / dense_s / 1e9:.0f} GFLOP/s)")
        for skew in _SKEWS.value:
            sizes = jnp.asarray(group_sizes(skew, n, e))
            for name, fn in impls.items():
                seconds = timed(lambda: fn(x, sizes, w), _REPEATS.value)
                row = {"shape": shape, "rows": n, "d": d, "f": f, "experts": e, "dtype": _DTYPE.value, "skew": skew,
                       "implementation": name, "ms": seconds * 1e3, "gflops": flops / seconds / 1e9,
                       "dense_ms": dense_s * 1e3, "efficiency": dense_s / seconds,
                       "max_group": int(sizes.max())}
                results.append(row)
                print(f"  {skew:>8} {name:>12}: {row['ms']:8.1f} ms {row['gflops']:7.0f} GFLOP/s "
                      f"efficiency {row['efficiency']:.2f}")
    if _JSON_OUT.value:
        with open(_JSON_OUT.value + ".tmp", "w") as fh:
            json.dump({"machine": machine, "results": results}, fh, indent=2)
        os.replace(_JSON_OUT.value + ".tmp", _JSON_OUT.value)


if __name__ == "__main__":
    app.run(main)
