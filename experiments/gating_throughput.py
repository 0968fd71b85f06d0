"""Static versus dynamic gating (papers.md B) on the expert-parallel CPU mesh, against one device dropless.

For each layer shape and number of tokens: tokens/s of one MoE layer, its activation (temporary) memory per
device from the compiled executable's memory analysis, the static-gating waste factor (slots processed /
pairs routed, ideally E * capacity_fraction / k), and the number of shapes dynamic gating compiled.
Results JSON is written after every cell (a rerun skips finished cells); a plot goes beside it.

  python experiments/gating_throughput.py --workdir=experiments/results/gating_throughput
"""

from __future__ import annotations

import functools
import json
import os
import time

import jax

jax.config.update("jax_num_cpu_devices", 8)  # before any device is touched; harmless where devices are real

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from flax import nnx  # noqa: E402
from tqdm import tqdm  # noqa: E402

import moejax  # noqa: E402
from moejax import parallel  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", "workdir/gating_throughput", "Where results.json and plot.png go.")
_TOKENS = flags.DEFINE_list("tokens", ["1024", "2048", "4096", "8192"], "Tokens per forward (all devices).")
_LAYERS = flags.DEFINE_list("layers", ["lm", "decoder"], "Which layer shapes (see LAYERS).")
_FRACTION = flags.DEFINE_float("capacity_fraction", 0.25, "Static gating's slots per expert / local tokens.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed repeats (median reported).")

# lm: the paper's LM-like layer (many experts, top-2, every expert busy);
# decoder: few tokens per step over many experts, so most experts are idle in a step (sparse activation).
LAYERS = {
    "lm": dict(hidden=256, ffn=512, experts=64, top_k=2, token_scale=1),
    "decoder": dict(hidden=256, ffn=512, experts=128, top_k=2, token_scale=16),  # tokens / 16 per step
}


def layer_block(shape: dict) -> moejax.CausalLM:
    config = moejax.ModelConfig(
        architecture="mixtral", vocab_size=128, hidden_size=shape["hidden"], num_layers=1, num_heads=4,
        num_kv_heads=4, head_dim=shape["hidden"] // 4, moe_layers=(True,), num_experts=shape["experts"],
        num_experts_per_tok=shape["top_k"], moe_intermediate_size=shape["ffn"], norm_topk_prob=True)
    return moejax.random_model(config, seed=0)


def measure(fn, args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def temp_bytes(block, x, mask) -> int:
    """Activation memory: the compiled program's temporary allocation (per device under shard_map)."""
    graphdef, state = nnx.split(block)
    fn = jax.jit(lambda s, x, m: nnx.merge(graphdef, s)(x, m)[0])
    return int(fn.lower(state, x, mask).compile().memory_analysis().temp_size_in_bytes)


def call(block, x, mask):
    """One MoE block call, jitted over its split state (nnx.jit's per-call graph bookkeeping costs tens of
    ms, which would swamp the small cells)."""
    graphdef, state = nnx.split(block)
    return _call(graphdef, state, x, mask)


@functools.partial(jax.jit, static_argnums=0)
def _call(graphdef, state, x, mask):
    return nnx.merge(graphdef, state)(x, mask)


def run_cell(layer: str, tokens: int, mesh, repeats: int) -> dict:
    shape = LAYERS[layer]
    model = layer_block(shape)
    rng = np.random.default_rng(tokens)
    x = jnp.asarray(rng.normal(size=(tokens, shape["hidden"])).astype(np.float32))
    mask = jnp.ones((tokens,), bool)
    cell = {"layer": layer, "tokens": tokens, **shape, "capacity_fraction": _FRACTION.value,
            "devices": mesh.size}

    single = model.moe_blocks()[0]
    cell["single_device_dropless"] = {"seconds": measure(lambda: call(single, x, mask)[0], (), repeats),
                                      "temp_bytes": temp_bytes(single, x, mask)}

    static = parallel.expert_parallel(model, mesh, "static", capacity_fraction=_FRACTION.value).moe_blocks()[0]
    _, r_static, slots = call(static, x, mask)
    routed = tokens * shape["top_k"]
    cell["static"] = {"seconds": measure(lambda: call(static, x, mask)[0], (), repeats),
                      "temp_bytes": temp_bytes(static, x, mask),
                      "slots_per_expert_per_device": int(slots),
                      "waste_factor": int(slots) * shape["experts"] * mesh.size / routed,
                      "dropped_fraction": float(1 - r_static.keep.sum() / routed)}

    dynamic_model = parallel.expert_parallel(model, mesh, "dynamic")
    runner = parallel.ExpertParallelRunner(
        dynamic_model, lambda m, x: (lambda out: (out[0], out[2]))(call(m.moe_blocks()[0], x, mask)))
    pairs_per_device = tokens // mesh.size * shape["top_k"]
    runner(x, pairs_per_device=pairs_per_device)  # settles the bucket
    bucketed = parallel.with_bucket(dynamic_model, runner.bucket).moe_blocks()[0]
    cell["dynamic"] = {"seconds": measure(lambda: call(bucketed, x, mask)[0], (), repeats),
                       "temp_bytes": temp_bytes(bucketed, x, mask), "bucket": runner.bucket,
                       "compiled_buckets": sorted(runner.compiled_buckets)}
    for name in ("single_device_dropless", "static", "dynamic"):
        cell[name]["tokens_per_second"] = tokens / cell[name]["seconds"]
    cell["dynamic_over_static_throughput"] = cell["static"]["seconds"] / cell["dynamic"]["seconds"]
    cell["dynamic_over_static_memory"] = cell["dynamic"]["temp_bytes"] / cell["static"]["temp_bytes"]
    active = np.asarray(parallel_free_counts(single, x, mask))
    cell["idle_expert_fraction"] = float((active == 0).mean())
    return cell


def parallel_free_counts(block, x, mask):
    """Pairs per expert, from the single-device block's routing (which experts a step activates)."""
    from moejax import stats

    return stats.expert_counts(block.route(x, mask, False))


def plot(results: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for layer in sorted({c["layer"] for c in results}):
        cells = sorted((c for c in results if c["layer"] == layer), key=lambda c: c["tokens"])
        tokens = [c["tokens"] for c in cells]
        for mode, style in (("static", "--"), ("dynamic", "-"), ("single_device_dropless", ":")):
            axes[0].plot(tokens, [c[mode]["tokens_per_second"] for c in cells], style, marker="o",
                         label=f"{layer} {mode}")
            axes[1].plot(tokens, [c[mode]["temp_bytes"] / 2**20 for c in cells], style, marker="o",
                         label=f"{layer} {mode}")
    for ax, label in zip(axes, ("tokens / s", "activation memory per device (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens per forward")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("Static vs dynamic gating, 8-device expert-parallel CPU mesh")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv):
    del argv
    os.makedirs(_WORKDIR.value, exist_ok=True)
    path = os.path.join(_WORKDIR.value, "results.json")
    done = json.load(open(path)) if os.path.exists(path) else {"cells": []}
    done["machine"] = {"devices": jax.device_count(), "backend": jax.default_backend(), "jax": jax.__version__,
                       "cpus": os.cpu_count()}
    mesh = parallel.make_mesh()
    todo = [(layer, int(t) // LAYERS[layer]["token_scale"]) for layer in _LAYERS.value for t in _TOKENS.value
            if not any(c["layer"] == layer and c["tokens"] == int(t) // LAYERS[layer]["token_scale"]
                       for c in done["cells"])]
    for layer, tokens in tqdm(todo, desc="gating cells"):
        cell = run_cell(layer, tokens, mesh, _REPEATS.value)
        done["cells"].append(cell)
        with open(path + ".tmp", "w") as f:
            json.dump(done, f, indent=2)
        os.replace(path + ".tmp", path)
        tqdm.write(f"{layer:8s} {tokens:6d} tokens: static {cell['static']['tokens_per_second']:9.0f} tok/s, "
                   f"dynamic {cell['dynamic']['tokens_per_second']:9.0f} tok/s "
                   f"({cell['dynamic_over_static_throughput']:.2f}x), single device "
                   f"{cell['single_device_dropless']['tokens_per_second']:9.0f} tok/s; memory dynamic/static "
                   f"{cell['dynamic_over_static_memory']:.2f}; waste {cell['static']['waste_factor']:.1f}x")
    plot(done["cells"], os.path.join(_WORKDIR.value, "plot.png"))
    print(f"Wrote {path} (paper, single node LM: dynamic gating 6.21x static throughput)")


if __name__ == "__main__":
    app.run(main)
