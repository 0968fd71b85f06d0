"""Capacity-aware inference sweep (papers.md A): capacity factor x drop strategy -> quality, loads, speed.

Per cell: perplexity on the evaluation sequences, drop rate, tokens that lost every expert, max/mean load
of the experts after the policy, the modelled MoE-layer speedup under expert parallelism (a layer waits for
its busiest device) and the measured one: the time of the busiest device's expert work at the loads the
policy leaves, against dropless (this CPU has no real 8-device mesh to time per device).

Results JSON is written after every cell (a rerun skips finished cells), with a table and a plot of
perplexity against measured speedup.

  python experiments/capacity_sweep.py --checkpoint=PATH --text_file=FILE --workdir=workdir/capacity_sweep
"""

from __future__ import annotations

import functools
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from flax import nnx
from tqdm import tqdm

import moejax
from moejax import evaluation, placement, stats
from moejax.generate import pad_prompts
from moejax.kernels import grouped_ffn

_CHECKPOINT = flags.DEFINE_string("checkpoint", "", "A load_pretrained checkpoint; empty: a random built-in "
                                  "model (its quality numbers mean nothing: use a trained model).")
_TEXT = flags.DEFINE_string("text_file", "", "Evaluation text, tokenised with the checkpoint's tokenizer.json; "
                            "empty or no tokenizer: random token sequences.")
_WORKDIR = flags.DEFINE_string("workdir", "workdir/capacity_sweep", "Where results.json and plot.png go.")
_FACTORS = flags.DEFINE_list("factors", ["none", "0.5", "1.0", "1.25", "1.5", "2.0"], "Capacity factors.")
_STRATEGIES = flags.DEFINE_list("strategies", ["score", "first", "last", "random", "expanded_local",
                                               "expanded_global"], "Drop strategies.")
_DEVICES = flags.DEFINE_integer("num_devices", 8, "Devices of the expert axis (local experts, busiest device).")
_SEQUENCES = flags.DEFINE_integer("sequences", 32, "Evaluation sequences.")
_LENGTH = flags.DEFINE_integer("length", 128, "Tokens per evaluation sequence.")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Sequences per forward (tokens in one batch share capacity).")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed repeats of the busiest device's expert work.")


def policy_for(factor: str, strategy: str, num_devices: int) -> moejax.MoEPolicy:
    if factor == "none":
        return moejax.MoEPolicy()
    if strategy.startswith("expanded_"):
        return moejax.MoEPolicy(capacity_factor=float(factor), expanded=strategy.split("_", 1)[1],
                                num_devices=num_devices)
    return moejax.MoEPolicy(capacity_factor=float(factor), drop=strategy)


def evaluation_sequences(model) -> list[list[int]]:
    tokenizer = moejax.load_tokenizer(_CHECKPOINT.value) if _CHECKPOINT.value else None
    if _TEXT.value and tokenizer is not None:
        ids = tokenizer.encode(open(_TEXT.value, encoding="utf-8").read()).ids
        n = _LENGTH.value
        return [ids[i:i + n] for i in range(0, len(ids) - n, n)][:_SEQUENCES.value]
    logging.warning("no text + tokenizer: evaluating on random token sequences")
    rng = np.random.default_rng(0)
    return rng.integers(0, model.config.vocab_size, size=(_SEQUENCES.value, _LENGTH.value)).tolist()


@functools.partial(jax.jit, static_argnums=0)
def _routings(graphdef, state, tokens, mask):
    return nnx.merge(graphdef, state).forward(tokens, token_mask=mask).routings


def layer_counts(model, sequences) -> dict[int, tuple[np.ndarray, np.ndarray, np.ndarray, int, int]]:
    """Per MoE layer, over every evaluation batch: routed, kept, and kept-of-routed pairs per expert, tokens,
    tokens that lost every expert."""
    graphdef, state = nnx.split(model)
    totals: dict[int, list] = {}
    for start in range(0, len(sequences), _BATCH.value):
        tokens, mask = pad_prompts(sequences[start:start + _BATCH.value])
        routings = _routings(graphdef, state, jnp.asarray(tokens), jnp.asarray(mask))
        loads = stats.layer_loads(routings, jnp.asarray(mask), top_k=model.config.num_experts_per_tok)
        for layer, l in loads.items():
            t = totals.setdefault(layer, [0, 0, 0, 0, 0])
            for i, value in enumerate((l.routed, l.kept, l.kept_of_routed, l.tokens, l.tokens_without_experts)):
                t[i] = t[i] + value
    return {layer: tuple(t) for layer, t in totals.items()}


def busiest_device_seconds(block, kept: np.ndarray, device_of_expert: np.ndarray, num_devices: int,
                           batches: int) -> float:
    """Time of the expert work of the device with the most kept pairs (per batch), with its real weights."""
    per_batch = np.ceil(kept / batches).astype(np.int32)
    busiest = int(np.argmax(stats.device_loads(per_batch, device_of_expert, num_devices)))
    experts = np.flatnonzero(device_of_expert == busiest)
    sizes = jnp.asarray(per_batch[experts])
    rows = jnp.asarray(np.random.default_rng(0).normal(size=(max(1, int(sizes.sum())), block.config.hidden_size)),
                       block.w_gate[...].dtype)
    weights = tuple(w[...][experts] for w in (block.w_gate, block.w_up, block.w_down))
    fn = jax.jit(grouped_ffn)
    jax.block_until_ready(fn(rows, sizes, *weights))
    times = []
    for _ in range(_REPEATS.value):
        start = time.perf_counter()
        jax.block_until_ready(fn(rows, sizes, *weights))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def run_cell(model, sequences, factor, strategy, dropless_time) -> dict:
    policy = policy_for(factor, strategy, _DEVICES.value)
    m = moejax.with_policy(model, policy)
    device_of_expert = placement.contiguous(model.config.num_experts, _DEVICES.value)
    counts = layer_counts(m, sequences)
    batches = -(-len(sequences) // _BATCH.value)
    blocks = {i: layer.mlp for i, layer in enumerate(m.layers) if counts.get(i) is not None}
    layer_time = sum(busiest_device_seconds(blocks[i], c[1], device_of_expert, _DEVICES.value, batches)
                     for i, c in counts.items())
    routed = sum(c[0].sum() for c in counts.values())
    kept_of_routed = sum(c[2].sum() for c in counts.values())
    return {
        "factor": factor, "strategy": strategy, "policy": repr(policy),
        "perplexity": evaluation.perplexity(m, sequences, batch_size=_BATCH.value),
        "drop_rate": float(1 - kept_of_routed / routed),
        "added_pairs": float((sum(c[1].sum() for c in counts.values()) - kept_of_routed) / routed),
        "tokens_without_experts": float(sum(c[4] for c in counts.values()) / sum(c[3] for c in counts.values())),
        "kept_max_over_mean": float(np.mean([stats.max_over_mean(c[1]) for c in counts.values()])),
        "routed_max_over_mean": float(np.mean([stats.max_over_mean(c[0]) for c in counts.values()])),
        "modelled_speedup": float(np.mean([stats.modelled_speedup(c[0], c[1], device_of_expert, _DEVICES.value)
                                           for c in counts.values()])),
        "busiest_device_seconds": layer_time,
        "measured_speedup": (dropless_time / layer_time) if dropless_time else 1.0,
    }


def main(argv):
    del argv
    if _CHECKPOINT.value:
        model = moejax.load_pretrained(_CHECKPOINT.value)
    else:
        config = moejax.ModelConfig(architecture="olmoe", vocab_size=512, hidden_size=128, num_layers=2,
                                    num_heads=4, num_kv_heads=4, head_dim=32, qk_norm=True, moe_layers=(True, True),
                                    num_experts=32, num_experts_per_tok=4, moe_intermediate_size=64)
        model = moejax.random_model(config, seed=0)
    sequences = evaluation_sequences(model)
    os.makedirs(_WORKDIR.value, exist_ok=True)
    path = os.path.join(_WORKDIR.value, "results.json")
    results = json.load(open(path)) if os.path.exists(path) else {"cells": []}
    results["settings"] = {"checkpoint": _CHECKPOINT.value or "random built-in", "text_file": _TEXT.value,
                           "sequences": len(sequences), "length": _LENGTH.value, "batch_size": _BATCH.value,
                           "num_devices": _DEVICES.value, "jax": jax.__version__, "backend": jax.default_backend()}
    cells = [("none", "dropless")] + [(f, s) for f in _FACTORS.value if f != "none" for s in _STRATEGIES.value]
    done = {(c["factor"], c["strategy"]) for c in results["cells"]}
    dropless = next((c for c in results["cells"] if c["factor"] == "none"), None)
    for factor, strategy in tqdm([c for c in cells if c not in done], desc="capacity cells"):
        cell = run_cell(model, sequences, factor, strategy, dropless and dropless["busiest_device_seconds"])
        if factor == "none":
            dropless = cell
        results["cells"].append(cell)
        with open(path + ".tmp", "w") as f:
            json.dump(results, f, indent=2)
        os.replace(path + ".tmp", path)
        tqdm.write(f"gamma={factor:>5} {strategy:>16}: ppl {cell['perplexity']:9.3f}  drop {cell['drop_rate']:.3f}  "
                   f"max/mean {cell['kept_max_over_mean']:.2f}  speedup modelled {cell['modelled_speedup']:.2f} "
                   f"measured {cell['measured_speedup']:.2f}")
    plot(results["cells"], os.path.join(_WORKDIR.value, "plot.png"))
    print(f"Wrote {path}")


def plot(cells: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for strategy in sorted({c["strategy"] for c in cells}):
        points = sorted((c["measured_speedup"], c["perplexity"]) for c in cells if c["strategy"] == strategy)
        ax.plot(*zip(*points), marker="o", label=strategy)
    ax.set_xlabel("measured MoE-layer speedup (busiest device)")
    ax.set_ylabel("perplexity")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    app.run(main)
