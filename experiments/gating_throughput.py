"""Static versus dynamic gating (papers.md B) on the expert-parallel CPU mesh, against one device dropless.

For each layer shape and number of tokens: tokens/s of one MoE layer (static, dynamic and one device timed
side by side), its activation (temporary) memory per device from the compiled executable's memory analysis,
the static-gating waste factor (slots processed / pairs routed, ideally E * capacity_fraction / k), and the
number of shapes dynamic gating compiled. Results JSON is written after every cell (a rerun skips finished
cells); a plot goes beside it. Settings: configs/gating_throughput.py.

  python experiments/gating_throughput.py --workdir=experiments/results/gating_throughput
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import harness
import moejax
from moejax import parallel, stats
from moejax.results import Results

REPORT_PLOT = "static vs dynamic gating throughput"

# lm: the paper's LM-like layer (many experts, top-2, every expert busy);
# decoder: few tokens per step over many experts, so most experts are idle in a step (sparse activation).
# mt_encoder / mt_decoder: NLLB-MoE-54B's layers (d 2048, ffn 8192 = 4 d, 128 experts, top-2) scaled to d 256,
# the decoder with the tokens of a decode step; their experts NLLB's (relu, not gated, with biases).
LAYERS = {
    "lm": dict(hidden=256, ffn=512, experts=64, top_k=2, token_scale=1),
    "decoder": dict(hidden=256, ffn=512, experts=128, top_k=2, token_scale=16),  # tokens / 16 per step
    "mt_encoder": dict(hidden=256, ffn=1024, experts=128, top_k=2, token_scale=1, nllb=True),
    "mt_decoder": dict(hidden=256, ffn=1024, experts=128, top_k=2, token_scale=16, nllb=True),
}


def layer_block(shape: dict) -> moejax.CausalLM:
    config = moejax.ModelConfig(
        architecture="mixtral", vocab_size=128, hidden_size=shape["hidden"], num_layers=1, num_heads=4,
        num_kv_heads=4, head_dim=shape["hidden"] // 4, moe_layers=(True,), num_experts=shape["experts"],
        num_experts_per_tok=shape["top_k"], moe_intermediate_size=shape["ffn"], norm_topk_prob=True,
        **(dict(hidden_act="relu", moe_gated=False, moe_bias=True) if shape.get("nllb") else {}))
    return moejax.random_model(config, seed=0)


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


def run_cell(layer: str, tokens: int, mesh, capacity_fraction: float, repeats: int) -> dict:
    shape = LAYERS[layer]
    model = layer_block(shape)
    rng = np.random.default_rng(tokens)
    x = jnp.asarray(rng.normal(size=(tokens, shape["hidden"])).astype(np.float32))
    mask = jnp.ones((tokens,), bool)
    cell = {"layer": layer, "tokens": tokens, **shape, "capacity_fraction": capacity_fraction,
            "devices": mesh.size}

    single = model.moe_blocks()[0]
    static = parallel.expert_parallel(model, mesh, "static", capacity_fraction=capacity_fraction).moe_blocks()[0]
    _, r_static, slots = call(static, x, mask)
    routed = tokens * shape["top_k"]
    cell["single_device_dropless"] = {"temp_bytes": temp_bytes(single, x, mask)}
    cell["static"] = {"temp_bytes": temp_bytes(static, x, mask), "slots_per_expert_per_device": int(slots),
                      "waste_factor": int(slots) * shape["experts"] * mesh.size / routed,
                      "dropped_fraction": float(1 - r_static.keep.sum() / routed)}

    dynamic_model = parallel.expert_parallel(model, mesh, "dynamic")
    runner = parallel.ExpertParallelRunner(
        dynamic_model, lambda m, x: (lambda out: (out[0], out[2]))(call(m.moe_blocks()[0], x, mask)))
    pairs_per_device = tokens // mesh.size * shape["top_k"]
    runner(x, pairs_per_device=pairs_per_device)  # settles the bucket
    bucketed = parallel.with_bucket(dynamic_model, runner.bucket).moe_blocks()[0]
    cell["dynamic"] = {"temp_bytes": temp_bytes(bucketed, x, mask), "bucket": runner.bucket,
                       "compiled_buckets": sorted(runner.compiled_buckets)}
    blocks = {"single_device_dropless": single, "static": static, "dynamic": bucketed}
    seconds = harness.median_seconds({name: functools.partial(lambda b: call(b, x, mask)[0], block)
                                      for name, block in blocks.items()}, repeats)
    for name in blocks:
        cell[name].update(seconds=seconds[name], tokens_per_second=tokens / seconds[name])
    cell["dynamic_over_static_throughput"] = cell["static"]["seconds"] / cell["dynamic"]["seconds"]
    cell["dynamic_over_static_memory"] = cell["dynamic"]["temp_bytes"] / cell["static"]["temp_bytes"]
    active = np.asarray(stats.expert_counts(call(single, x, mask)[1]))  # one device, dropless: the routed pairs
    cell["idle_expert_fraction"] = float((active == 0).mean())
    return cell


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


def describe_cell(cell: dict) -> str:
    return (f"{cell['layer']:8s} {cell['tokens']:6d} tokens: static {cell['static']['tokens_per_second']:9.0f} tok/s, "
            f"dynamic {cell['dynamic']['tokens_per_second']:9.0f} tok/s ({cell['dynamic_over_static_throughput']:.2f}x), "
            f"single device {cell['single_device_dropless']['tokens_per_second']:9.0f} tok/s; memory dynamic/static "
            f"{cell['dynamic_over_static_memory']:.2f}; waste {cell['static']['waste_factor']:.1f}x")


def report_section(r: dict) -> list[str]:
    """The reproduction report's gating section."""
    lines = ["## Static versus dynamic gating (Huang et al., papers.md B)", "",
             "One MoE layer on the expert-parallel mesh: tokens/s and temporary memory per device. "
             + harness.PAPERS["gating"], "",
             "| layer | tokens | static tok/s | dynamic tok/s | dynamic / static | memory dynamic / static | static waste |",
             "|---|---|---|---|---|---|---|"]
    for c in r["cells"]:
        lines.append(f"| {c['layer']} | {c['tokens']} | {c['static']['tokens_per_second']:.0f} | "
                     f"{c['dynamic']['tokens_per_second']:.0f} | {c['dynamic_over_static_throughput']:.2f}x | "
                     f"{c['dynamic_over_static_memory']:.2f} | {c['static']['waste_factor']:.1f}x |")
    return lines


def main(config, workdir):
    # the cells' numbers depend on every setting but the cells' own keys (layers, token counts)
    results = Results(workdir, settings={k: v for k, v in config.to_dict().items() if k not in ("layers", "tokens")})
    results.data.update(harness.header())
    mesh = parallel.make_mesh()
    keys = [{"layer": layer, "tokens": int(t) // LAYERS[layer]["token_scale"]} for layer in config.layers
            for t in config.tokens]
    harness.sweep(results, keys, lambda key: run_cell(key["layer"], key["tokens"], mesh, config.capacity_fraction,
                                                      config.repeats), describe_cell, desc="gating cells")
    results.save()
    plot(results.cells, os.path.join(workdir, "plot.png"))
    print(f"Wrote {results.path} ({harness.PAPERS['gating']})")


if __name__ == "__main__":
    harness.run(main, workdir="workdir/gating_throughput")
