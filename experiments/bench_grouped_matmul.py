"""Experts-step throughput: grouped_ffn's implementations against a dense SwiGLU FFN of equal useful FLOPs.

For each routing skew, N = num_tokens * top_k rows sorted by expert go through grouped_ffn (SwiGLU, f32
accumulation); the dense baseline runs the same N rows through one [d, f] gate/up and one [f, d] down.
efficiency = dense time / path time (1.0: as fast as a dense FFN doing the same useful work). Timings are
interleaved (dense, then each path, per repeat) so background load hits them alike; best and median of
--repeats after warm-up, each call ended with jax.block_until_ready.

  python experiments/bench_grouped_matmul.py                                # d=512 f=1024 E=8 top-2, 2048 tokens
  python experiments/bench_grouped_matmul.py --num_tokens=2 --experts=64   # a decode step: 4 rows, 64 experts
  python experiments/bench_grouped_matmul.py --implementations=xla,xla@128,ragged_dot      # the xla loop, tile 128
"""

from __future__ import annotations

import functools
import json
import os
import platform
import shlex
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from moejax import kernels

_NUM_TOKENS = flags.DEFINE_integer("num_tokens", 2048, "Tokens; rows N = num_tokens * top_k.")
_HIDDEN = flags.DEFINE_integer("hidden", 512, "Model width d.")
_FFN = flags.DEFINE_integer("ffn", 1024, "Expert FFN width f.")
_EXPERTS = flags.DEFINE_integer("experts", 8, "Experts E.")
_TOP_K = flags.DEFINE_integer("top_k", 2, "Experts per token.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Input and weight dtype.")
_SKEW = flags.DEFINE_list("skew", ["balanced", "hot3x", "zipf"],
                          "Routing skews: balanced, hot3x (one expert gets 3x its share), zipf (share ~ 1/rank).")
_IMPLEMENTATIONS = flags.DEFINE_list(
    "implementations", ["xla", "ragged_dot"],
    "grouped_ffn implementations; xla@TILE times the xla loop with that tile; mosaic_gpu@BMxBNxBN_DOWNxSTAGESxBAND "
    "the Mosaic GPU kernels with that tile config (rows, fused gate/up columns, down columns, pipeline stages, "
    "column tiles per band).")
_REPEATS = flags.DEFINE_integer("repeats", 10, "Timed repeats after warm-up.")
_JSON_OUT = flags.DEFINE_string("json_out", "", "Also write the results here as JSON.")


def group_sizes(skew: str, rows: int, experts: int) -> np.ndarray:
    """Rows per expert for a skew, rounded by largest remainder so they sum to `rows`; with fewer rows than
    experts (decode), balanced rows go one each to experts spread over the range."""
    share = np.ones(experts)
    if skew == "hot3x":  # expert 0 gets 3 / E of the rows, the others share the rest equally
        share[:] = (experts - 3.0) / (experts - 1)
        share[0] = 3.0
    elif skew == "zipf":
        share = 1.0 / np.arange(1, experts + 1)
    elif skew != "balanced":
        raise ValueError(f"unknown skew {skew!r}; supported: balanced, hot3x, zipf")
    exact = share / share.sum() * rows
    sizes = np.floor(exact).astype(np.int32)
    left = rows - sizes.sum()
    if skew == "balanced":
        order = np.linspace(0, experts, left, endpoint=False).astype(int)
    else:
        order = np.argsort(sizes - exact, kind="stable")[:left]
    sizes[order] += 1
    return sizes


def machine() -> dict:
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                 platform.processor())
    return {"nproc": os.cpu_count(), "cpu": model, "jax": jax.__version__, "backend": jax.default_backend(),
            "auto": ",".join(kernels.default_implementation())}


def swiglu(x, w_gate, w_up, w_down):
    """The dense baseline, with the grouped path's dtypes (f32 accumulation, h cast back to x's dtype)."""
    h = jax.nn.silu(jnp.dot(x, w_gate, preferred_element_type=jnp.float32)) * jnp.dot(
        x, w_up, preferred_element_type=jnp.float32)
    return jnp.dot(h.astype(x.dtype), w_down, preferred_element_type=jnp.float32).astype(x.dtype)


def implementation(spec: str):
    """A grouped_ffn implementation from its flag spelling: a name, or an implementation object with its
    config for xla@TILE and mosaic_gpu[_interpret]@BMxBNxBN_DOWNxSTAGESxBAND."""
    if "@" not in spec:
        return spec
    name, config = spec.split("@", 1)
    if name == "xla":
        return kernels.Xla(kernels.XlaConfig(tile=int(config)))
    if name in ("mosaic_gpu", "mosaic_gpu_interpret"):
        bm, bn, bn_down, stages, band = (int(v) for v in config.split("x"))
        return kernels.MosaicGpu(kernels.MosaicGpuConfig(gate_up=kernels.TileConfig(bm, bn, stages, band),
                                                         matmul=kernels.TileConfig(bm, bn_down, stages, band)),
                                 interpret=name == "mosaic_gpu_interpret")
    raise ValueError(f"no config spelling for {name!r}: use xla@TILE or mosaic_gpu@BMxBNxBN_DOWNxSTAGESxBAND")


def path(spec: str):
    return functools.partial(kernels.grouped_ffn, implementation=implementation(spec))


def interleaved_times(calls: dict, repeats: int) -> dict[str, list[float]]:
    for fn in calls.values():  # warm-up: compile and first run
        jax.block_until_ready(fn())
        jax.block_until_ready(fn())
    times = {name: [] for name in calls}
    for _ in range(repeats):
        for name, fn in calls.items():
            start = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append(time.perf_counter() - start)
    return times


def main(argv):
    del argv
    info = machine()
    command = "python " + shlex.join(["experiments/bench_grouped_matmul.py", *sys.argv[1:]])
    n, d, f, e = _NUM_TOKENS.value * _TOP_K.value, _HIDDEN.value, _FFN.value, _EXPERTS.value
    dtype = jnp.dtype(_DTYPE.value)
    print(f"# machine: nproc={info['nproc']}, cpu={info['cpu']}, jax {info['jax']}, backend {info['backend']} "
          f"(auto -> {info['auto']})")
    print(f"# command: {command}")
    print(f"# load average at start: {os.getloadavg()[0]:.2f}")
    print(f"# shape: {_NUM_TOKENS.value} tokens x top-{_TOP_K.value} = N {n} rows, d={d}, f={f}, E={e}, "
          f"{_DTYPE.value}; useful FLOPs {6 * n * d * f / 1e9:.3f} GFLOP; times in ms (best / median of "
          f"{_REPEATS.value})")

    # drawn on the device: Mixtral-sized weights (2.8 GB in bf16) would take a while through numpy
    keys = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(keys[0], (n, d), dtype)
    w_gate, w_up = (jax.random.normal(k, (e, d, f), dtype) / np.sqrt(d).astype(dtype) for k in keys[1:3])
    w_down = jax.random.normal(keys[3], (e, f, d), dtype) / np.sqrt(f).astype(dtype)
    dense = jax.jit(swiglu)
    dense_weights = (w_gate[0], w_up[0], w_down[0])  # sliced once: an eager slice per call would be timed too
    paths = {name: jax.jit(path(name)) for name in _IMPLEMENTATIONS.value}
    results = []
    for skew in _SKEW.value:
        sizes = group_sizes(skew, n, e)
        gs = jnp.asarray(sizes)
        calls = {"dense": lambda: dense(x, *dense_weights)}
        calls.update({name: functools.partial(fn, x, gs, w_gate, w_up, w_down) for name, fn in paths.items()})
        outs = {}
        for name, fn in list(calls.items()):
            try:
                outs[name] = np.asarray(fn(), np.float32)
            except Exception as e:  # a tile config that does not compile (e.g. out of registers or SMEM)
                print(f"# {name} failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); dropped")
                del calls[name]
        del outs["dense"]
        first = next(iter(outs.values()))
        agree = max(float(np.abs(out - first).max()) for out in outs.values())
        times = interleaved_times(calls, _REPEATS.value)
        best = {name: min(t) for name, t in times.items()}
        median = {name: float(np.median(t)) for name, t in times.items()}
        active = int((sizes > 0).sum())
        print(f"\n{skew}: rows per expert max {sizes.max()} min {sizes.min()} ({active} active experts); "
              f"max |difference| between paths {agree:.1e}")
        print(f"  {'path':>12} {'best':>9} {'median':>9} {'efficiency best/median':>24}")
        for name in calls:
            eff_best, eff_median = best["dense"] / best[name], median["dense"] / median[name]
            print(f"  {name:>12} {best[name] * 1e3:9.3f} {median[name] * 1e3:9.3f} {eff_best:11.2f} / {eff_median:.2f}")
            results.append({"skew": skew, "path": name, "best_ms": best[name] * 1e3, "median_ms": median[name] * 1e3,
                            "efficiency_best": eff_best, "efficiency_median": eff_median,
                            "group_sizes": sizes.tolist()})
    print(f"\n# load average at end: {os.getloadavg()[0]:.2f}")
    if _JSON_OUT.value:
        with open(_JSON_OUT.value, "w") as fh:
            json.dump({"machine": info, "command": command, "rows": n, "hidden": d, "ffn": f, "experts": e,
                       "dtype": _DTYPE.value, "repeats": _REPEATS.value, "results": results}, fh, indent=2)


if __name__ == "__main__":
    app.run(main)
